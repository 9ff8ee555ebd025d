"""A fake OpenAI / Azure OpenAI / Anthropic upstream for tests: HTTP/1.1 over TLS (or plain TCP).

It is written by hand on top of asyncio (no HTTP library), so every byte on the wire is chosen here:
how the body is cut into writes, when each write goes out, how it is framed, compressed or cut off.

    fake = FakeUpstream()            # FakeUpstream(*, tls=True, port=0, streams_dir=None)
    fake.start()
    client = openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=fake.ssl_context()))
    ...
    req = fake.wait(1)[0]            # the request as received, and what was answered
    fake.stop()

Run alone (demos, benchmarks):  python -m tests.fakes.upstream --port 8443 [--plain]
prints "listening on PORT" and serves until interrupted.

Recorded exchanges (`fake.requests`, one dict per request, appended when the request has been read;
the response fields are final once ``done`` is true -- use ``fake.wait(n)``):
    method, path (with query), headers [(name, value)] as received, body (bytes, de-chunked),
    x_fake {key: value}, status, response_headers [(name, value)],
    response_body  the body as produced before Content-Encoding (what a client decodes), i.e. exactly
                   the bytes of the writes that were sent; None with ``record=0``
    response_len, response_sha256   of that body (kept even with ``record=0``)
    wire_bytes     body bytes on the wire (compressed, without chunk framing)
    writes         body writes sent; write_times: time.time() of each, write_sizes: raw (uncompressed)
                   bytes of each (both not with ``record=0``)
    conn           number of the connection (1, 2, ...): same number = same keep-alive connection
    cut            the fake dropped the connection before the end of the body (``cut_after``)
    complete       the whole body was sent (and the chunked terminator, if any)
    client_gone    the client hung up before the end
    t_request, t_headers, t_end   time.time() when the request was read / head sent / response over
    done           the response is over (complete, cut or client gone)

Behaviour is picked by the request header ``x-fake: key=value; key=value`` (values may be
percent-encoded). Unknown keys or bad values answer 400 with error type ``fake_error``.
    stream=<file>      answer 200 text/event-stream with the exact bytes of <streams dir>/<file>,
                       e.g. stream=openai_chat/basic.sse
    synth=<N>          answer a generated chat stream (OpenAI format, facts §1): role chunk, N content
                       chunks of a few characters (some non-ASCII, see `synth_text`), finish chunk
                       (``stop``), [DONE]; with the request's stream_options.include_usage, "usage":null
                       on each chunk and a usage chunk. Generated lazily: constant memory.
    chunk=event|<N>|random:<seed>
                       how the (uncompressed) body is cut into writes: one write per SSE event
                       (default; a JSON body is one write), every N bytes, or seeded random sizes
                       (1..64, biased to fall inside UTF-8 sequences and between CR and LF)
    delay_ms=<D>       sleep D ms before each body write (default 0)
    first_delay_ms=<D> sleep D ms before the first body write instead of delay_ms
    headers_delay_ms=<D> sleep D ms before sending the status line and headers
    cut_after=<K>      after K body writes, drop the connection abruptly (no chunked terminator, no TLS
                       close_notify); the delay before write K+1 still applies. No cut when the body has
                       K writes or fewer. K=0 drops right after the headers.
    framing=chunked|length|close
                       Transfer-Encoding: chunked (default for event streams), Content-Length (default
                       for JSON and errors), or close-delimited (connection closed after the body)
    encoding=gzip|deflate|br|zstd
                       Content-Encoding of the body; each write is compressed and flushed on its own
                       (zlib Z_SYNC_FLUSH, brotli flush, zstd FLUSH_BLOCK) so it can be decoded on
                       arrival; the stream end (Z_FINISH, ...) rides on the last write
    status=<code>      answer that status with a provider-shaped JSON error (OpenAI:
                       {"error":{"message","type","param","code"}}; 429 -> code rate_limit_exceeded and
                       ``retry-after: 0``; 500 -> type server_error; /v1/messages: Anthropic's shape)
    body=nonjson|empty|html
                       special bodies: ``nonjson`` a text/plain "error code: 502" with status 502 (or
                       status=), ``empty`` no body (status 200 or status=), ``html`` a Cloudflare-like
                       HTML 502 page
    content_type=<v>   override Content-Type (percent-encode ';' as %3B); ``none`` omits the header
    record=0           keep no response_body / write_times (for 100k-event benchmarks)

Without ``x-fake``, realistic defaults by route (JSON bodies the openai SDK parses):
    POST /v1/chat/completions   stream: openai_chat/include_usage.sse (stream_options.include_usage),
                                tool_calls_parallel.sse (tools), n2_interleaved.sse (n == 2), else
                                basic.sse; otherwise a chat.completion built from the same stream
    POST /v1/responses          stream: openai_responses/text.sse (function_calls.sse with tools);
                                otherwise the response object of that stream's response.completed
    POST /v1/completions        stream: openai_completions/basic.sse; otherwise a text_completion
    POST /v1/embeddings         embedding list, one vector per input; base64 (float32 LE) when
                                encoding_format=base64 (what the openai SDK sends by default)
    GET  /v1/models[/<id>]      model list / model
    POST /v1/messages           Anthropic: stream anthropic/text.sse (tool_use.sse with tools), or a message
    Azure /openai/deployments/<d>/<op>?api-version=..., /openai/v1/<op>: like the OpenAI op; chat
                                streams azure_chat/content_filter_results.sse, JSON keys sorted
    anything else               404 {"error":{"message":"Invalid URL (METHOD /path)",...}}
Every response carries x-request-id: req_<32 hex>, openai-processing-ms, openai-version, x-ratelimit-*,
set-cookie: __cf_bm=<random>; path=/; HttpOnly (a secret to be redacted), date, and the like.

The stream files are looked up in ``streams_dir``, else $R4U_STREAMS_DIR, else tests/data/streams.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email.utils
import hashlib
import http
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import ssl
import string
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tests.harness import STREAMS

__all__ = ["FakeUpstream", "default_streams_dir", "split_events", "synth_text", "make_cert", "get_header"]

_BASE62 = string.ascii_letters + string.digits


def default_streams_dir() -> Path:
    env = os.environ.get("R4U_STREAMS_DIR")
    return Path(env) if env else STREAMS


def get_header(headers: list[tuple[str, str]], name: str) -> str | None:
    """First value of header `name` (case-insensitive) in a list of pairs."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


# --------------------------------------------------------------------------------------------------
# TLS certificate

def make_cert(directory: str | Path) -> tuple[str, str]:
    """Write a fresh self-signed EC P-256 cert (and key) for the provider hosts; return (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    pub = key.public_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, "api.openai.com"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "r4u-mitm fake upstream"),
    ])
    now = datetime.now(timezone.utc)
    san = x509.SubjectAlternativeName([
        x509.DNSName("api.openai.com"),
        x509.DNSName("*.openai.azure.com"),
        x509.DNSName("api.anthropic.com"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )
    d = Path(directory)
    cert_file, key_file = d / "fake-upstream-cert.pem", d / "fake-upstream-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


# --------------------------------------------------------------------------------------------------
# Bodies: events, cutting, compression

_LINE_END = re.compile(rb"\r\n|\r|\n")


def split_events(data: bytes) -> list[bytes]:
    """Cut an SSE body after each blank line (any line ending); an unterminated tail is the last piece."""
    out: list[bytes] = []
    start = line_start = 0
    for m in _LINE_END.finditer(data):
        if m.start() == line_start:          # empty line: end of an event
            out.append(data[start:m.end()])
            start = m.end()
        line_start = m.end()
    if start < len(data):
        out.append(data[start:])
    return out


def _sse_data(raw: bytes) -> Iterator[tuple[str, str]]:
    """(event name, data) of each event of one of our stream files (enough for building JSON bodies)."""
    for ev in split_events(raw):
        name, data = "message", []
        for line in _LINE_END.split(ev):
            text = line.decode("utf-8", "replace")
            f, _, v = text.partition(":")
            v = v[1:] if v.startswith(" ") else v
            if f == "event":
                name = v
            elif f == "data":
                data.append(v)
        if data:
            yield name, "\n".join(data)


_NASTY = re.compile(rb"[\x80-\xbf]|(?<=\r)\n")   # a cut before these splits UTF-8 or CR|LF


def _rechunk(pieces: Iterable[bytes], mode: str) -> Iterator[bytes]:
    if mode == "event":
        for p in pieces:
            if p:
                yield p
        return
    buf = bytearray()
    if mode.isdigit():
        n = int(mode)
        for p in pieces:
            buf += p
            while len(buf) >= n:
                yield bytes(buf[:n])
                del buf[:n]
        if buf:
            yield bytes(buf)
        return
    # random:<seed> -- decisions depend only on the body bytes, so a seed always gives the same cuts
    rng = random.Random(mode.partition(":")[2])
    window = 64
    it = iter(pieces)
    exhausted = False
    while True:
        while not exhausted and len(buf) <= window:
            try:
                buf += next(it)
            except StopIteration:
                exhausted = True
        if not buf:
            return
        limit = min(window, len(buf))
        size = 0
        if rng.random() < 0.5:
            nasty = [m.start() for m in _NASTY.finditer(buf, 1, limit)]   # cut before it
            if nasty:
                size = rng.choice(nasty)
        if not size:
            size = rng.randint(1, limit)
        yield bytes(buf[:size])
        del buf[:size]


class _Encoder:
    def __init__(self, name: str):
        self.name = name
        if name in ("gzip", "deflate"):
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31 if name == "gzip" else 15)
        elif name == "br":
            import brotli
            self._b = brotli.Compressor()
        elif name == "zstd":
            try:
                from compression import zstd  # type: ignore[import-not-found]
            except ImportError:
                from backports import zstd  # type: ignore[no-redef]
            self._zstd = zstd
            self._c = zstd.ZstdCompressor()
        else:
            raise ValueError(name)

    def piece(self, data: bytes) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.name == "br":
            return self._b.process(data) + self._b.flush()
        return self._c.compress(data, mode=self._zstd.ZstdCompressor.FLUSH_BLOCK)

    def finish(self) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._z.flush(zlib.Z_FINISH)
        if self.name == "br":
            return self._b.finish()
        return self._c.flush(mode=self._zstd.ZstdCompressor.FLUSH_FRAME)


def _encode(pieces: Iterable[bytes], encoding: str | None) -> Iterator[tuple[bytes, bytes]]:
    """(raw piece, wire piece) pairs; the encoder's final bytes go with the last piece (one lookahead)."""
    if not encoding:
        for p in pieces:
            yield p, p
        return
    enc = _Encoder(encoding)
    it = iter(pieces)
    prev = next(it, None)
    if prev is None:
        yield b"", enc.piece(b"") + enc.finish()
        return
    for p in it:
        yield prev, enc.piece(prev)
        prev = p
    yield prev, enc.piece(prev) + enc.finish()


# --------------------------------------------------------------------------------------------------
# Synthetic chat stream

_SYNTH_WORDS = ["Hello", ",", " wörld", "!", " Ça", " va", "?", " 北京", "欢迎", " 你", " 😊", " naïve",
                " café", " Ω≈", " —", " ok", ".", "\n"]

_SNAPSHOTS = {
    "gpt-4o": "gpt-4o-2024-08-06", "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1": "gpt-4.1-2025-04-14", "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14", "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
}


def synth_text(n: int) -> str:
    """The content a `synth=n` stream accumulates to."""
    w = _SYNTH_WORDS
    full, rest = divmod(n, len(w))
    return "".join(w) * full + "".join(w[:rest])


def _synth_chat(n: int, model: str, include_usage: bool) -> Iterator[bytes]:
    rng = random.Random(n)
    cid = "chatcmpl-" + "".join(rng.choices(_BASE62, k=29))
    fp = "fp_" + "".join(rng.choices("0123456789abcdef", k=10))
    head = ('data: {"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
            '"service_tier":"default","system_fingerprint":"%s","choices":'
            % (cid, int(time.time()), json.dumps(model), fp))
    usage_null = ',"usage":null' if include_usage else ""

    def obf() -> str:
        return "".join(rng.choices(_BASE62, k=rng.randint(1, 15)))

    def chunk(delta: str, finish: str = "null") -> bytes:
        return ('%s[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]%s,"obfuscation":"%s"}\n\n'
                % (head, delta, finish, usage_null, obf())).encode()

    yield chunk('{"role":"assistant","content":"","refusal":null}')
    words = [json.dumps(w, ensure_ascii=False) for w in _SYNTH_WORDS]
    for i in range(n):
        yield chunk('{"content":%s}' % words[i % len(words)])
    yield chunk("{}", '"stop"')
    if include_usage:
        usage = _chat_usage(11, n)
        yield ('%s[],"usage":%s,"obfuscation":"%s"}\n\n'
               % (head, json.dumps(usage, separators=(",", ":")), obf())).encode()
    yield b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------
# JSON bodies for non-streaming requests, built from the stream files so both agree

def _pretty(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def _compact(obj: object, sort: bool = False) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort).encode()


def _chat_usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _prompt_tokens(req_json: dict) -> int:
    return 8 + len(json.dumps(req_json.get("messages") or req_json.get("input") or req_json.get("prompt") or ""))//4


def _chat_completion(raw: bytes, req_json: dict, azure: bool) -> bytes:
    top: dict = {}
    choices: dict[int, dict] = {}
    usage = None
    deltas = 0
    prompt_filter = None
    for _, data in _sse_data(raw):
        if data.startswith("[DONE]"):
            break
        ch = json.loads(data)
        if "prompt_filter_results" in ch:
            prompt_filter = ch["prompt_filter_results"]
        if ch.get("object") != "chat.completion.chunk":
            continue
        if not top:
            top = {k: ch.get(k) for k in ("id", "created", "model", "service_tier", "system_fingerprint")}
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch.get("choices") or []:
            st = choices.setdefault(c["index"], {"content": None, "refusal": None, "tools": {}, "finish": None,
                                                 "filter": None})
            d = c.get("delta") or {}
            if isinstance(d.get("content"), str):
                st["content"] = (st["content"] or "") + d["content"]
                deltas += 1
            if isinstance(d.get("refusal"), str) and d["refusal"]:
                st["refusal"] = (st["refusal"] or "") + d["refusal"]
            for tc in d.get("tool_calls") or []:
                t = st["tools"].setdefault(tc["index"], {"id": None, "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                t["id"] = tc.get("id") or t["id"]
                fn = tc.get("function") or {}
                t["function"]["name"] += fn.get("name") or ""
                t["function"]["arguments"] += fn.get("arguments") or ""
                deltas += 1
            if c.get("finish_reason"):
                st["finish"] = c["finish_reason"]
            if c.get("content_filter_results"):
                st["filter"] = c["content_filter_results"]
    n = max(1, int(req_json.get("n") or 1))
    out_choices = []
    for i in range(n):
        st = choices.get(i, choices[0])
        msg: dict = {"role": "assistant", "content": st["content"] if st["content"] else None,
                     "refusal": st["refusal"], "annotations": []}
        if st["tools"]:
            msg["tool_calls"] = [st["tools"][k] for k in sorted(st["tools"])]
        choice: dict = {"index": i, "message": msg, "logprobs": None, "finish_reason": st["finish"] or "stop"}
        if azure:
            choice["content_filter_results"] = st["filter"] or {}
        out_choices.append(choice)
    if usage is None:
        usage = _chat_usage(_prompt_tokens(req_json), deltas * n)
    body = {"id": top["id"], "object": "chat.completion", "created": top["created"], "model": top["model"],
            "choices": out_choices, "usage": usage, "service_tier": top["service_tier"],
            "system_fingerprint": top["system_fingerprint"]}
    if azure:
        body["prompt_filter_results"] = prompt_filter or []
        return _compact(body, sort=True)
    return _pretty(body)


def _text_completion(raw: bytes, req_json: dict) -> bytes:
    top: dict = {}
    text, finish, n = "", None, 0
    for _, data in _sse_data(raw):
        if data.startswith("[DONE]"):
            break
        ch = json.loads(data)
        top = top or {k: ch.get(k) for k in ("id", "created", "model")}
        for c in ch.get("choices") or []:
            text += c.get("text") or ""
            n += 1
            finish = c.get("finish_reason") or finish
    prompt = _prompt_tokens(req_json)
    return _pretty({"id": top["id"], "object": "text_completion", "created": top["created"],
                    "model": top["model"],
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish or "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}})


def _response_object(raw: bytes) -> bytes:
    for _, data in _sse_data(raw):
        ev = json.loads(data)
        if ev.get("type") in ("response.completed", "response.incomplete", "response.failed"):
            return _pretty(ev["response"])
    raise ValueError("no terminal response event")


def _anthropic_message(raw: bytes) -> bytes:
    msg: dict = {}
    blocks: dict[int, dict] = {}
    partial: dict[int, str] = {}
    for _, data in _sse_data(raw):
        ev = json.loads(data)
        t = ev.get("type")
        if t == "message_start":
            msg = ev["message"]
        elif t == "content_block_start":
            blocks[ev["index"]] = dict(ev["content_block"])
        elif t == "content_block_delta":
            b, d = blocks[ev["index"]], ev["delta"]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                partial[ev["index"]] = partial.get(ev["index"], "") + d["partial_json"]
            elif d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                b["signature"] += d["signature"]
        elif t == "message_delta":
            msg.update(ev["delta"])
            usage = dict(msg.get("usage") or {})
            usage.update(ev.get("usage") or {})
            msg["usage"] = usage
    for i, s in partial.items():
        blocks[i]["input"] = json.loads(s) if s else {}
    msg["content"] = [blocks[i] for i in sorted(blocks)]
    return _compact(msg)


def _embedding_vector(text: str, dims: int) -> array:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    v = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return array("f", (x / norm for x in v))


def _embeddings(req_json: dict) -> bytes:
    inp = req_json.get("input", "")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
        inputs = [inp]
    else:
        inputs = list(inp) if isinstance(inp, list) else [inp]
    model = req_json.get("model") or "text-embedding-3-small"
    dims = int(req_json.get("dimensions") or (3072 if "large" in str(model) else 1536))
    b64 = req_json.get("encoding_format") == "base64"
    data, tokens = [], 0
    for i, x in enumerate(inputs):
        vec = _embedding_vector(json.dumps(x, ensure_ascii=False), dims)
        if sys.byteorder != "little":
            vec.byteswap()
        emb: object = base64.b64encode(vec.tobytes()).decode() if b64 else vec.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens += len(x) if isinstance(x, list) else max(1, len(str(x).split()))
    return _pretty({"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


_MODELS = [("gpt-4o-mini", 1721172741), ("gpt-4o", 1715367049), ("gpt-4.1", 1744316542),
           ("gpt-4.1-mini", 1744318173), ("gpt-3.5-turbo-instruct", 1692901427),
           ("text-embedding-3-small", 1705948997)]


def _model(mid: str, created: int = 1698959748) -> dict:
    return {"id": mid, "object": "model", "created": created, "owned_by": "system"}


# --------------------------------------------------------------------------------------------------
# Errors

_OPENAI_ERRORS = {
    400: ("We could not parse the JSON body of your request.", "invalid_request_error", None),
    401: ("Incorrect API key provided: sk-test. You can find your API key at "
          "https://platform.openai.com/account/api-keys.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model", "invalid_request_error", None),
    404: ("The model `gpt-9` does not exist or you do not have access to it.", "invalid_request_error",
          "model_not_found"),
    429: ("Rate limit reached for gpt-4o in organization org-fake on tokens per min (TPM): Limit 30000, "
          "Used 30000, Requested 120. Please try again in 240ms. Visit "
          "https://platform.openai.com/account/rate-limits to learn more.", "tokens", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!", "server_error", None),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
}


def _openai_error(status: int, message: str | None = None, etype: str | None = None,
                  code: str | None = None) -> bytes:
    m, t, c = _OPENAI_ERRORS.get(status, (f"HTTP {status}", "server_error" if status >= 500
                                          else "invalid_request_error", None))
    body = {"error": {"message": message or m, "type": etype or t, "param": None, "code": code or c}}
    return (json.dumps(body, indent=4, ensure_ascii=False) + "\n").encode()


def _anthropic_error(status: int) -> bytes:
    t = _ANTHROPIC_ERRORS.get(status, "api_error")
    return _compact({"type": "error", "error": {"type": t, "message": t.replace("_", " ").capitalize()},
                     "request_id": "req_011C" + "".join(random.choices(_BASE62, k=20))})


_HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
             b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n"
             b"</html>\r\n")


# --------------------------------------------------------------------------------------------------
# The server

class _FakeError(Exception):
    pass


@dataclass
class _Plan:
    status: int
    content_type: str | None
    pieces: Iterable[bytes]
    stream: bool
    provider: str = "openai"
    extra_headers: list[tuple[str, str]] = field(default_factory=list)


_X_FAKE_KEYS = {"stream", "synth", "chunk", "delay_ms", "first_delay_ms", "headers_delay_ms", "cut_after",
                "framing", "encoding", "status", "body", "content_type", "record"}
_INT_KEYS = {"synth", "delay_ms", "first_delay_ms", "headers_delay_ms", "cut_after", "status"}


def _parse_x_fake(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        k, eq, v = part.partition("=")
        k, v = k.strip(), urllib.parse.unquote(v.strip())
        if not eq or k not in _X_FAKE_KEYS:
            raise _FakeError(f"x-fake: unknown or malformed item {part!r}")
        if k in _INT_KEYS and not v.isdigit():
            raise _FakeError(f"x-fake: {k} needs a non-negative integer, got {v!r}")
        out[k] = v
    c = out.get("chunk")
    if c is not None and not (c == "event" or (c.isdigit() and int(c) > 0) or c.startswith("random:")):
        raise _FakeError(f"x-fake: chunk must be event, a positive number or random:<seed>, got {c!r}")
    if out.get("framing", "chunked") not in ("chunked", "length", "close"):
        raise _FakeError(f"x-fake: framing must be chunked, length or close, got {out['framing']!r}")
    if out.get("encoding", "gzip") not in ("gzip", "deflate", "br", "zstd"):
        raise _FakeError(f"x-fake: encoding must be gzip, deflate, br or zstd, got {out['encoding']!r}")
    if out.get("body", "nonjson") not in ("nonjson", "empty", "html"):
        raise _FakeError(f"x-fake: body must be nonjson, empty or html, got {out['body']!r}")
    if "stream" in out and "synth" in out:
        raise _FakeError("x-fake: stream and synth exclude each other")
    if "status" in out and not 100 <= int(out["status"]) <= 599:
        raise _FakeError("x-fake: status out of range")
    return out


class _BadRequest(Exception):
    pass


_AZURE_PATH = re.compile(r"^/openai/(?:deployments/(?P<dep>[^/]+)|v1)(?P<op>/.*)$")


class FakeUpstream:
    def __init__(self, *, tls: bool = True, port: int = 0, host: str = "127.0.0.1",
                 streams_dir: str | Path | None = None):
        self.tls = tls
        self.host = host
        self.port = port
        self.streams_dir = Path(streams_dir) if streams_dir else default_streams_dir()
        self.requests: list[dict] = []
        self.cert_file: str | None = None
        self.key_file: str | None = None
        self._tmp: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._cond = threading.Condition()
        self._files: dict[str, bytes] = {}
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._conn_count = 0

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> "FakeUpstream":
        if self.tls and not self.cert_file:
            self._tmp = tempfile.mkdtemp(prefix="r4u-fake-upstream-")
            self.cert_file, self.key_file = make_cert(self._tmp)
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._start_error is not None:
            raise RuntimeError(f"fake upstream failed to start: {self._start_error!r}") from self._start_error
        if not self._started.is_set():
            raise RuntimeError("fake upstream did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            try:
                fut.result(5)
            except Exception:
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
        self._thread = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.cert_file = self.key_file = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this fake (and nothing else), e.g. for httpx2.Client(verify=...)."""
        if not self.cert_file:
            raise RuntimeError("no TLS: start() a FakeUpstream(tls=True) first")
        return ssl.create_default_context(cafile=self.cert_file)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clear(self) -> None:
        with self._cond:
            self.requests.clear()

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[dict]:
        """Wait until at least `count` exchanges are done; return all requests so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(1 for r in self.requests if r["done"]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake upstream: {count} finished exchanges expected, "
                                       f"have {sum(1 for r in self.requests if r['done'])}")
                self._cond.wait(left)
            return list(self.requests)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        try:
            ctx = None
            if self.tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(self.cert_file, self.key_file)
                ctx.set_alpn_protocols(["http/1.1"])
            self._server = loop.run_until_complete(asyncio.start_server(
                self._on_connection, self.host, self.port, ssl=ctx, limit=1 << 20, reuse_address=True))
            self.port = self._server.sockets[0].getsockname()[1]
        except BaseException as e:  # noqa: BLE001 -- reported by start()
            self._start_error = e
            self._started.set()
            loop.close()
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    @staticmethod
    def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ssl.SSLError, ConnectionError, OSError)):
            return  # handshakes that a client refused, resets: part of the game here
        loop.default_exception_handler(context)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)

    # -- connections -----------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        aborted = False
        self._conn_count += 1
        conn = self._conn_count
        try:
            while True:
                try:
                    req = await self._read_request(reader, writer)
                except _BadRequest as e:
                    msg = str(e).encode()
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(msg), msg))
                    break
                if req is None:
                    break
                req["conn"] = conn
                keep, aborted = await self._respond(req, writer)
                if not keep:
                    break
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            aborted = True
            writer.transport.abort()
        finally:
            self._conns.discard(task)
            if not aborted:
                await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (Exception, asyncio.CancelledError):
            writer.transport.abort()

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise _BadRequest("incomplete request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise _BadRequest("request head too large") from None
        lines = head[:-4].lstrip(b"\r\n").split(b"\r\n")
        try:
            method, target, version = lines[0].decode("latin-1").split(" ")
        except ValueError:
            raise _BadRequest("bad request line") from None
        if not version.startswith("HTTP/1."):
            raise _BadRequest("HTTP/1.x only")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _BadRequest("bad header line")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        if (get_header(headers, "expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        te = (get_header(headers, "transfer-encoding") or "").lower()
        body = b""
        if "chunked" in te:
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":   # trailers
                        pass
                    break
                parts.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise _BadRequest("bad chunk end")
            body = b"".join(parts)
        elif get_header(headers, "content-length") is not None:
            try:
                n = int(get_header(headers, "content-length") or "")
            except ValueError:
                raise _BadRequest("bad content-length") from None
            body = await reader.readexactly(n)
        conn = (get_header(headers, "connection") or "").lower()
        keep = not ("close" in conn or (version == "HTTP/1.0" and "keep-alive" not in conn))
        return {"method": method, "path": target, "version": version, "headers": headers, "body": body,
                "keep_alive": keep}

    # -- routing ---------------------------------------------------------------------------------
    def _file(self, rel: str) -> bytes:
        data = self._files.get(rel)
        if data is None:
            base = self.streams_dir.resolve()
            p = (base / rel).resolve()
            if base not in p.parents or not p.is_file():
                raise _FakeError(f"x-fake: no stream file {rel!r} under {base}")
            data = self._files[rel] = p.read_bytes()
        return data

    def _sse(self, rel: str, provider: str = "openai") -> _Plan:
        return _Plan(200, "text/event-stream; charset=utf-8", split_events(self._file(rel)), True, provider)

    def _json(self, body: bytes, provider: str = "openai", status: int = 200) -> _Plan:
        return _Plan(status, "application/json", [body], False, provider)

    def _plan(self, req: dict, xf: dict[str, str]) -> _Plan:
        method = req["method"]
        path = urllib.parse.urlsplit(req["path"]).path
        provider, op = "openai", path
        m = _AZURE_PATH.match(path)
        if m:
            provider, op = "azure", "/v1" + m.group("op")
        elif path.startswith("/v1/messages"):
            provider = "anthropic"
        try:
            rj = json.loads(req["body"]) if req["body"] else {}
        except ValueError:
            rj = None
        if not isinstance(rj, dict) and method == "POST":
            return self._error(400, provider)

        if "status" in xf or "body" in xf:
            status = int(xf.get("status", "0"))
            body = xf.get("body")
            if body == "nonjson":
                return _Plan(status or 502, "text/plain; charset=UTF-8", [b"error code: 502"], False, provider)
            if body == "html":
                return _Plan(status or 502, "text/html", [_HTML_502], False, provider)
            if body == "empty":
                return _Plan(status or 200, "application/json", [], False, provider)
            return self._error(status, provider)
        if "stream" in xf:
            return self._sse(xf["stream"], provider)
        if "synth" in xf:
            model = str((rj or {}).get("model") or "gpt-4o-mini")
            include_usage = bool(((rj or {}).get("stream_options") or {}).get("include_usage"))
            return _Plan(200, "text/event-stream; charset=utf-8",
                         _synth_chat(int(xf["synth"]), _SNAPSHOTS.get(model, model), include_usage), True, provider)

        rj = rj or {}
        stream = rj.get("stream") is True
        if method == "POST" and op == "/v1/chat/completions":
            if provider == "azure":
                f = "azure_chat/content_filter_results.sse"
            elif (rj.get("stream_options") or {}).get("include_usage"):
                f = "openai_chat/include_usage.sse"
            elif rj.get("tools"):
                f = "openai_chat/tool_calls_parallel.sse"
            elif rj.get("n") == 2:
                f = "openai_chat/n2_interleaved.sse"
            else:
                f = "openai_chat/basic.sse"
            if stream:
                return self._sse(f, provider)
            return self._json(_chat_completion(self._file(f), rj, provider == "azure"), provider)
        if method == "POST" and op == "/v1/responses":
            f = "openai_responses/function_calls.sse" if rj.get("tools") else "openai_responses/text.sse"
            return self._sse(f, provider) if stream else self._json(_response_object(self._file(f)), provider)
        if method == "POST" and op == "/v1/completions":
            f = "openai_completions/basic.sse"
            return self._sse(f, provider) if stream else self._json(_text_completion(self._file(f), rj), provider)
        if method == "POST" and op == "/v1/embeddings":
            return self._json(_embeddings(rj), provider)
        if method == "GET" and op == "/v1/models":
            return self._json(_pretty({"object": "list", "data": [_model(i, c) for i, c in _MODELS]}), provider)
        if method == "GET" and op.startswith("/v1/models/"):
            return self._json(_pretty(_model(urllib.parse.unquote(op[len("/v1/models/"):]))), provider)
        if method == "POST" and op == "/v1/messages":
            f = "anthropic/tool_use.sse" if rj.get("tools") else "anthropic/text.sse"
            return self._sse(f, provider) if stream else self._json(_anthropic_message(self._file(f)), provider)
        return self._json(_openai_error(404, f"Invalid URL ({method} {path})", "invalid_request_error", None),
                          provider, 404)

    def _error(self, status: int, provider: str) -> _Plan:
        body = _anthropic_error(status) if provider == "anthropic" else _openai_error(status)
        plan = _Plan(status, "application/json", [body], False, provider)
        if status == 429:
            plan.extra_headers.append(("retry-after", "0"))
        return plan

    def _headers(self, plan: _Plan, req: dict) -> list[tuple[str, str]]:
        rid = "req_" + secrets.token_hex(16)
        h: list[tuple[str, str]] = [("Date", email.utils.formatdate(usegmt=True))]
        if plan.content_type:
            h.append(("Content-Type", plan.content_type))
        h += [
            ("access-control-expose-headers", "X-Request-ID"),
            ("openai-organization", "user-fake0r4u0mitm"),
            ("openai-processing-ms", str(random.randint(80, 900))),
            ("openai-project", "proj_" + "".join(random.choices(_BASE62, k=24))),
            ("openai-version", "2020-10-01"),
            ("x-envoy-upstream-service-time", str(random.randint(80, 900))),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-remaining-tokens", str(29_999_000 + random.randint(0, 990))),
            ("x-ratelimit-reset-requests", "6ms"),
            ("x-ratelimit-reset-tokens", "0s"),
            ("x-request-id", rid),
        ]
        if plan.provider == "azure":
            m = _AZURE_PATH.match(urllib.parse.urlsplit(req["path"]).path)
            h += [("apim-request-id", str(uuid.uuid4())), ("azureml-model-session", "d" + str(random.randint(1, 999))),
                  ("x-ms-rai-invoked", "true"), ("x-ms-region", "Sweden Central"),
                  ("x-ms-deployment-name", (m.group("dep") if m else None) or "gpt-4o")]
        elif plan.provider == "anthropic":
            h += [("request-id", "req_011C" + "".join(random.choices(_BASE62, k=20))),
                  ("anthropic-organization-id", str(uuid.uuid4())),
                  ("anthropic-ratelimit-requests-limit", "4000"),
                  ("anthropic-ratelimit-requests-remaining", "3999")]
        h += plan.extra_headers
        h += [
            ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
            ("cf-cache-status", "DYNAMIC"),
            ("set-cookie", f"__cf_bm={secrets.token_urlsafe(32)}-{int(time.time())}-1.0.1.1-"
                           f"{secrets.token_urlsafe(60)}; path=/; HttpOnly"),
            ("set-cookie", f"_cfuvid={secrets.token_urlsafe(30)}-{int(time.time() * 1000)}-0.0.1.1-604800000; "
                           "path=/; domain=.api.openai.com; HttpOnly; Secure; SameSite=None"),
            ("x-content-type-options", "nosniff"),
            ("server", "cloudflare"),
            ("cf-ray", secrets.token_hex(8) + "-ARN"),
            ("alt-svc", 'h3=":443"; ma=86400'),
        ]
        return h

    # -- responding ------------------------------------------------------------------------------
    async def _respond(self, req: dict, writer: asyncio.StreamWriter) -> tuple[bool, bool]:
        """Answer one request. Returns (keep the connection, connection aborted)."""
        rec = {"method": req["method"], "path": req["path"], "headers": req["headers"], "body": req["body"],
               "x_fake": {}, "status": None, "response_headers": [], "response_body": None,
               "response_len": 0, "response_sha256": None, "wire_bytes": 0, "writes": 0, "write_times": [],
               "write_sizes": [], "conn": req["conn"],
               "cut": False, "complete": False, "client_gone": False,
               "t_request": time.time(), "t_headers": None, "t_end": None, "done": False}
        with self._cond:
            self.requests.append(rec)
        try:
            xf_raw = [v for k, v in req["headers"] if k.lower() == "x-fake"]
            xf = _parse_x_fake(";".join(xf_raw))
            rec["x_fake"] = xf
            plan = self._plan(req, xf)
        except _FakeError as e:
            xf = {}
            plan = self._json(_openai_error(400, str(e), "fake_error", None), status=400)
        except Exception as e:  # noqa: BLE001 -- a fake bug must show up as an answer, not a hang
            xf = {}
            plan = self._json(_openai_error(500, f"fake upstream crashed: {e!r}", "fake_error", None),
                              status=500)

        framing = xf.get("framing") or ("chunked" if plan.stream else "length")
        encoding = xf.get("encoding")
        record = xf.get("record", "1") != "0"
        cut_after = int(xf["cut_after"]) if "cut_after" in xf else None
        delay = int(xf.get("delay_ms", "0")) / 1000
        first_delay = int(xf["first_delay_ms"]) / 1000 if "first_delay_ms" in xf else delay
        chunk_mode = xf.get("chunk", "event")

        pairs: Iterable[tuple[bytes, bytes]] = _encode(_rechunk(plan.pieces, chunk_mode), encoding)
        headers = self._headers(plan, req)
        if "content_type" in xf:
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            if xf["content_type"].lower() != "none":
                headers.insert(1, ("Content-Type", xf["content_type"]))
        pos = 2 if any(k == "Content-Type" for k, _ in headers) else 1
        keep = req["keep_alive"] and framing != "close"
        framing_headers = [("Connection", "keep-alive" if keep else "close")]
        if encoding:
            framing_headers.insert(0, ("Content-Encoding", encoding))
        if framing == "chunked":
            framing_headers.insert(0, ("Transfer-Encoding", "chunked"))
        elif framing == "length":
            pairs = list(pairs)
            framing_headers.insert(0, ("Content-Length", str(sum(len(w) for _, w in pairs))))
        headers[pos:pos] = framing_headers
        rec["status"] = plan.status
        rec["response_headers"] = headers

        try:
            reason = http.HTTPStatus(plan.status).phrase
        except ValueError:
            reason = "Unknown"
        head = f"HTTP/1.1 {plan.status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        body = bytearray()
        sha = hashlib.sha256()
        aborted = close_now = False
        try:
            if "headers_delay_ms" in xf:
                await asyncio.sleep(int(xf["headers_delay_ms"]) / 1000)
            writer.write(head.encode("latin-1"))
            rec["t_headers"] = time.time()
            await writer.drain()
            writes = 0
            for raw, wire in pairs:
                wait = first_delay if writes == 0 else delay
                if wait:
                    await asyncio.sleep(wait)
                if cut_after is not None and writes >= cut_after:
                    rec["cut"] = True
                    break
                if writer.transport.is_closing():
                    raise ConnectionResetError("client went away")
                if framing == "chunked":
                    if wire:
                        writer.write(b"%x\r\n%s\r\n" % (len(wire), wire))
                else:
                    writer.write(wire)
                writes += 1
                rec["writes"] = writes
                rec["wire_bytes"] += len(wire)
                sha.update(raw)
                rec["response_len"] += len(raw)
                if record:
                    body += raw
                    rec["write_times"].append(time.time())
                    rec["write_sizes"].append(len(raw))
                await writer.drain()
            if rec["cut"]:
                await self._flushed(writer)
                writer.transport.abort()
                aborted, keep = True, False
            else:
                if framing == "chunked":
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                rec["complete"] = True
                if framing == "close":
                    keep, close_now = False, True
        except (ConnectionError, OSError, ssl.SSLError):
            rec["client_gone"] = True
            writer.transport.abort()
            aborted, keep = True, False
        finally:
            with self._cond:
                rec["response_body"] = bytes(body) if record else None
                rec["response_sha256"] = sha.hexdigest()
                rec["t_end"] = time.time()
                rec["done"] = True
                self._cond.notify_all()
        if close_now:                      # close-delimited body: its end is the connection's end
            await self._close(writer)
            aborted = True                 # i.e. already closed
        return keep, aborted

    @staticmethod
    async def _flushed(writer: asyncio.StreamWriter, timeout: float = 2.0) -> None:
        """Wait until what was written has left asyncio's buffers (abort() would drop it)."""
        transport = writer.transport
        inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if transport.get_write_buffer_size() == 0 and (inner is None or inner.get_write_buffer_size() == 0):
                return
            await asyncio.sleep(0.001)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.fakes.upstream", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--plain", action="store_true", help="plain HTTP instead of TLS")
    ap.add_argument("--streams-dir", default=None)
    a = ap.parse_args(argv)
    fake = FakeUpstream(tls=not a.plain, port=a.port, host=a.host, streams_dir=a.streams_dir).start()
    print(f"listening on {fake.port}", flush=True)
    if fake.cert_file:
        print(f"cert {fake.cert_file}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
