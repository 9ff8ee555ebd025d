"""Bad input through a real mitmdump with the addon: each case has a defined outcome.

Whatever arrives, the client gets exactly what the upstream sent (checked byte for byte), and
R4U gets one trace that says what it could make of it. The proxy runs with a small
`r4u_max_body_bytes` (1 MiB) so that limits are reached with small bodies.

Two upstreams: the FakeUpstream serving files from a temp dir (any bytes, any content type), and
`RawUpstream` below, a tiny TLS server that answers canned bytes, for what the fake cannot send on
purpose: a Content-Encoding that lies, a gzip stream cut short under a clean HTTP end, compression
bombs, and a WebSocket upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import shutil
import socket
import ssl
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import brotli
import httpx
import openai
import pytest

from tests.conftest import SECRET, assert_no_secret, stream_bytes, traces_for
from tests.fakes.upstream import make_cert
from tests.harness import STREAMS, Mitmdump

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd

LIMIT = 1024 * 1024  # the proxy's r4u_max_body_bytes
CHAT_URL = "https://api.openai.com/v1/chat/completions"
ENDED = "stream ended by the upstream before its terminal event, after {} events"


# -- a raw upstream ---------------------------------------------------------------------------------

def http_response(status: str, headers: list[tuple[str, str]], body: bytes, *, length: bool = True) -> bytes:
    head = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class RawUpstream:
    """HTTP/1.1 over TLS, by hand: each request is answered with `answers[<its x-raw header>]`,
    bytes as they are (keep-alive unless the answer says `Connection: close`). A request with
    `Upgrade: websocket` is accepted (101) and its messages echoed until a close frame."""

    def __init__(self, workdir: Path) -> None:
        cert, key = make_cert(workdir)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answers: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.ws_messages: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = tls.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
                    n = int(headers.get("content-length", "0"))
                    while len(buf) < n:
                        buf += tls.recv(65536)
                    body, buf = buf[:n], buf[n:]
                    self.requests.append({"line": lines[0], "headers": headers, "body": body})
                    if headers.get("upgrade", "").lower() == "websocket":
                        self._websocket(tls, headers, buf)
                        return
                    answer = self.answers[headers.get("x-raw", "")]
                    tls.sendall(answer)
                    if b"\r\nconnection: close" in answer.partition(b"\r\n\r\n")[0].lower():
                        return
        except (OSError, ssl.SSLError, KeyError):
            return

    def _websocket(self, tls: ssl.SSLSocket, headers: dict[str, str], buf: bytes) -> None:
        accept = base64.b64encode(hashlib.sha1(
            headers["sec-websocket-key"].encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC11B46").digest()).decode()
        tls.sendall(http_response("101 Switching Protocols", [
            ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)], b"", length=False))
        reader = _Reader(tls, buf)
        while True:
            opcode, payload = read_frame(reader)
            if opcode == 8:
                tls.sendall(frame(8, payload))
                return
            self.ws_messages.append(payload)
            tls.sendall(frame(opcode, payload))


class _Reader:
    def __init__(self, sock, buf: bytes = b"") -> None:
        self.sock, self.buf = sock, buf

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame (RFC 6455 §5.2), masked when `mask` is given (client to server)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + payload
    return head + payload


def read_frame(reader: _Reader) -> tuple[int, bytes]:
    """One whole message: (opcode, payload), continuation frames joined."""
    opcode, payload, fin = _read_one(reader)
    while not fin:
        _, more, fin = _read_one(reader)
        payload += more
    return opcode, payload


def _read_one(reader: _Reader) -> tuple[int, bytes, bool]:
    b0, b1 = reader.read(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", reader.read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", reader.read(8))[0]
    mask = reader.read(4) if b1 & 0x80 else None
    payload = reader.read(n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b0 & 0x0F, payload, bool(b0 & 0x80)


# -- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files_dir(tmp_path_factory) -> Path:
    """The example stream files (the fake builds its default answers from them), and this module's."""
    path = tmp_path_factory.mktemp("bad-streams")
    shutil.copytree(STREAMS, path, dirs_exist_ok=True)
    return path


@pytest.fixture(scope="module")
def files_upstream(files_dir):
    from tests.fakes.upstream import FakeUpstream

    fake = FakeUpstream(tls=True, streams_dir=files_dir)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def raw_upstream(tmp_path_factory):
    raw = RawUpstream(tmp_path_factory.mktemp("raw-upstream"))
    yield raw
    raw.stop()


@pytest.fixture(scope="module")
def proxy_f(tmp_path_factory, files_upstream, r4u):
    """The addon in front of the file-serving FakeUpstream."""
    with Mitmdump(tmp_path_factory.mktemp("bad-files"), r4u_url=r4u.url, upstream_port=files_upstream.port,
                  options={"r4u_max_body_bytes": LIMIT}) as p:
        yield p


@pytest.fixture(scope="module")
def proxy_r(tmp_path_factory, raw_upstream, r4u):
    """The addon in front of the RawUpstream."""
    with Mitmdump(tmp_path_factory.mktemp("bad-raw"), r4u_url=r4u.url, upstream_port=raw_upstream.port,
                  options={"r4u_max_body_bytes": LIMIT}) as p:
        yield p


def client(proxy: Mitmdump) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=str(proxy.ca_file), timeout=60)


def post(proxy: Mitmdump, tag: str, *, x_fake: str | None = None, x_raw: str | None = None,
         content: bytes | None = None, headers: dict | None = None, url: str = CHAT_URL):
    """One request; (status, headers as received, body bytes as on the wire)."""
    h = {"X-R4U-Test": tag, "authorization": f"Bearer {SECRET}", **(headers or {})}
    if x_fake is not None:
        h["x-fake"] = x_fake
    if x_raw is not None:
        h["x-raw"] = x_raw
    if content is None:
        content = b'{"model":"gpt-4o-mini","stream":true,"messages":[]}'
        h.setdefault("content-type", "application/json")
    with client(proxy) as c, c.stream("POST", url, content=content, headers=h) as r:
        return r.status_code, r.headers, b"".join(r.iter_raw())


def served(fake) -> dict:
    """The last request the fake answered (tests here run one at a time)."""
    deadline = time.monotonic() + 10
    while not (fake.requests and fake.requests[-1]["done"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return fake.requests[-1]


def serve_file(files_dir: Path, data: bytes) -> str:
    name = f"{uuid.uuid4().hex}.bin"
    (files_dir / name).write_bytes(data)
    return name


def internal_errors(proxy: Mitmdump) -> list[str]:
    return [line for line in proxy.log().splitlines() if "internal error" in line or "error building" in line]


def peak_rss_mb(proxy: Mitmdump) -> float:
    for line in Path(f"/proc/{proxy.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(autouse=True)
def no_internal_errors(request):
    """Bad input is not an internal error: no test here may make the addon fail."""
    proxies = [request.getfixturevalue(n) for n in ("proxy_f", "proxy_r") if n in request.fixturenames]
    before = [len(internal_errors(p)) for p in proxies]
    yield
    for p, n in zip(proxies, before):
        assert internal_errors(p)[n:] == []


# -- malformed event streams --------------------------------------------------------------------------

GARBAGE = (b"garbage without a colon\n"
           b"\x00\x01\x02 binary\x7f noise\n"
           b": a comment\n"
           b"dat: misspelt field\n"
           b"DATA: upper-case field (not data)\n"
           b"data\n"                                  # a data line with an empty value
           b"\n"
           b"retry: not-a-number\n" + b"x" * 5000 + b": a 5000-byte field name\n"
           b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n"
           b"event: \n"
           b"data: [DONE]\n\n")


@pytest.mark.parametrize("case, raw, events, complete", [
    ("no blank lines", b"data: {\"a\":1}\ndata: {\"b\":2}\ndata: [DONE]\n", 0, False),
    ("garbage lines", GARBAGE, 3, True),
    ("CR-only endings", b"data: one\r\rdata: two\r\rdata: [DONE]\r\r", 3, True),
    ("0-byte stream", b"", 0, False),
], ids=["no-blank-lines", "garbage-lines", "cr-only", "0-byte-stream"])
@pytest.mark.parametrize("framing", ["chunked", "length"])
def test_malformed_event_streams(proxy_f, files_upstream, files_dir, r4u, tag, case, raw, events, complete, framing):
    """Outcome: the client gets the bytes; the trace keeps them as text, counts the events an SSE
    parser dispatches, and says whether the terminal event came."""
    name = serve_file(files_dir, raw)
    status, _, body = post(proxy_f, tag, x_fake=f"stream={name};chunk=random:3;framing={framing}")
    assert (status, body) == (200, raw)
    (trace,) = traces_for(r4u, tag)
    assert trace["response"] == raw.decode("utf-8", "replace")
    meta = trace["metadata"]
    assert meta["stream"] is True and meta["events"] == events and meta["stream_complete"] is complete
    assert trace["error"] == (None if complete else ENDED.format(events))


def test_a_10_mb_line(proxy_f, files_upstream, files_dir, r4u, tag):
    """Outcome: the client gets all 10 MB; the trace keeps the first r4u_max_body_bytes of it,
    says `truncated`, and leaves completeness unknown (null), with no error of its own."""
    raw = b"data: " + b"x" * (10 * 1024 * 1024) + b"\n\ndata: [DONE]\n\n"
    name = serve_file(files_dir, raw)
    status, _, body = post(proxy_f, tag, x_fake=f"stream={name}")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(raw).digest()
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert trace["response"] == raw[:LIMIT].decode()
    assert meta["truncated"] is True and meta["stream_complete"] is None and meta["events"] == 0
    assert trace["error"] is None
    assert meta["response_bytes"] == len(raw)


@pytest.mark.parametrize("content_type", ["text/event-stream; charset=utf-8", "application/json"])
def test_invalid_utf8(proxy_f, files_upstream, files_dir, r4u, tag, content_type):
    """Outcome: bytes reach the client untouched; the trace's text has U+FFFD for each invalid
    sequence, and the events around them still count."""
    raw = (b"data: {\"x\":\"\xff\xfe bad \xc3\"}\n\n"
           b"data: cut \xe2\x82\n\n"
           b"data: overlong \xc0\xaf and surrogate \xed\xa0\x80\n\n"
           b"data: [DONE]\n\n")
    name = serve_file(files_dir, raw)
    status, _, body = post(proxy_f, tag, x_fake=f"stream={name};chunk=1;content_type={content_type.replace(';', '%3B')}")
    assert (status, body) == (200, raw)
    (trace,) = traces_for(r4u, tag)
    assert trace["response"] == raw.decode("utf-8", "replace")
    if content_type.startswith("text/event-stream"):
        assert trace["metadata"]["events"] == 4 and trace["metadata"]["stream_complete"] is True
    assert trace["error"] is None


def test_invalid_utf8_request(proxy_f, files_upstream, r4u, tag):
    """Outcome: the upstream gets the bytes (and, being strict, answers 400); the trace's
    request is the text with U+FFFD."""
    request = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\xff\xfe \xc3"}]}'
    status, _, _ = post(proxy_f, tag, content=request, headers={"content-type": "application/json"})
    assert status == 400 and served(files_upstream)["body"] == request
    (trace,) = traces_for(r4u, tag)
    assert trace["request"] == request.decode("utf-8", "replace")
    assert trace["error"].startswith("HTTP 400: ")


def test_a_request_over_the_limit(proxy_f, files_upstream, r4u, tag):
    """Outcome: the upstream gets the whole request; the trace keeps its first r4u_max_body_bytes
    and says `truncated` (a request is a body too)."""
    request = json.dumps({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "Résumé ✓ " * 100_000}]}, ensure_ascii=False).encode()
    assert len(request) > LIMIT
    status, _, answer = post(proxy_f, tag, content=request, headers={"content-type": "application/json"})
    assert status == 200, answer
    assert served(files_upstream)["body"] == request
    (trace,) = traces_for(r4u, tag)
    assert trace["request"] == request[:LIMIT].decode("utf-8", "replace")
    assert trace["metadata"]["truncated"] is True and trace["error"] is None
    assert json.loads(trace["response"])["object"] == "chat.completion"


@pytest.mark.parametrize("coding, content, decode_error", [
    ("gzip", gzip.compress(b'{"model":"gpt-4o-mini","messages":[]}'), None),
    ("gzip", b'{"model":"gpt-4o-mini","messages":[]}',
     "request: content-encoding 'gzip' did not decode, raw bytes passed through"),
], ids=["gzip", "gzip-that-lies"])
def test_a_compressed_request(proxy_f, files_upstream, r4u, tag, coding, content, decode_error):
    """Outcome: the upstream gets the bytes as sent; the trace's request is the decoded text, and
    `metadata.decode_error` says when the request's Content-Encoding lied."""
    status, _, _ = post(proxy_f, tag, content=content,
                        headers={"content-type": "application/json", "content-encoding": coding})
    assert served(files_upstream)["body"] == content
    (trace,) = traces_for(r4u, tag)
    assert trace["request"] == '{"model":"gpt-4o-mini","messages":[]}'
    assert trace["status_code"] == status
    if decode_error:
        assert trace["metadata"]["decode_error"].startswith(decode_error)
    else:
        assert "decode_error" not in trace["metadata"]


# -- bodies that are not what they claim -----------------------------------------------------------

@pytest.mark.parametrize("x_fake, status, error, response", [
    ("body=nonjson", 502, "HTTP 502", "error code: 502"),
    ("body=html", 502, "HTTP 502", None),
    ("body=empty", 200, None, ""),
    ("body=empty;status=503", 503, "HTTP 503", ""),
])
def test_non_json_and_empty_bodies(proxy_f, files_upstream, r4u, tag, x_fake, status, error, response):
    """Outcome: the body as text, no model/usage, `error` says the status for non-2xx."""
    got_status, _, body = post(proxy_f, tag, x_fake=x_fake)
    sent = served(files_upstream)
    assert (got_status, body) == (status, sent["response_body"])
    (trace,) = traces_for(r4u, tag)
    assert trace["status_code"] == status and trace["error"] == error
    assert trace["response"] == (response if response is not None else sent["response_body"].decode())
    assert trace["metadata"]["model"] is None and trace["metadata"]["stream"] is False


def test_a_200_json_answer_that_is_not_json(proxy_f, files_upstream, files_dir, r4u, tag):
    raw = b"<html>not json</html>\n{\"truncated\": "
    name = serve_file(files_dir, raw)
    status, _, body = post(proxy_f, tag, x_fake=f"stream={name};content_type=application/json;framing=close")
    assert (status, body) == (200, raw)
    (trace,) = traces_for(r4u, tag)
    assert trace["response"] == raw.decode() and trace["error"] is None
    assert trace["metadata"]["model"] is None and trace["metadata"]["stream"] is False


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


CHAT_JSON = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour ✓"},
                                     "finish_reason": "stop"}]}).encode()
SSE = stream_bytes("openai_chat/basic.sse")


def lie_cases():
    cut_json = gzip_bytes(CHAT_JSON * 40)[:-30]
    cut_sse = gzip_bytes(SSE)[:-100]
    prefix = lambda cut: zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)  # noqa: E731
    return [
        # case, content-type, content-encoding, body, expected text, decode_error starts with
        ("gzip that is plain JSON", "application/json", "gzip", CHAT_JSON, CHAT_JSON.decode(),
         "content-encoding 'gzip' did not decode, raw bytes passed through"),
        ("br that is gzip", "application/json", "br", gzip_bytes(CHAT_JSON), None,
         "content-encoding 'br' did not decode, raw bytes passed through"),
        ("zstd that is plain SSE", "text/event-stream", "zstd", SSE, SSE.decode(),
         "content-encoding 'zstd' did not decode, raw bytes passed through"),
        ("an unknown coding", "application/json", "compress", CHAT_JSON, CHAT_JSON.decode(),
         "unsupported content-encoding: compress"),
        ("identity that is gzip", "application/json", "identity", gzip_bytes(CHAT_JSON), None, None),
        ("truncated gzip JSON", "application/json", "gzip", cut_json, prefix(cut_json).decode("utf-8", "replace"),
         "truncated gzip stream"),
        ("truncated gzip SSE", "text/event-stream", "gzip", cut_sse, prefix(cut_sse).decode("utf-8", "replace"),
         "truncated gzip stream"),
    ]


@pytest.mark.parametrize("case, ctype, coding, body, text, decode_error", lie_cases(), ids=[c[0] for c in lie_cases()])
def test_content_encoding_that_lies_or_is_cut(proxy_r, raw_upstream, r4u, tag, case, ctype, coding, body, text,
                                              decode_error):
    """Outcome: the client gets the bytes as sent (mitmproxy does not decode them). The trace
    decodes what it can: a coding that does not decode at all passes the raw bytes through as
    text; one cut short keeps what decoded; `metadata.decode_error` says which."""
    key = uuid.uuid4().hex
    raw_upstream.answers[key] = http_response("200 OK", [("Content-Type", ctype), ("Content-Encoding", coding)], body)
    status, headers, got = post(proxy_r, tag, x_raw=key)
    assert (status, got, headers["content-encoding"]) == (200, body, coding)
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert trace["response"] == (text if text is not None else body.decode("utf-8", "replace"))
    if decode_error:
        assert meta["decode_error"].startswith(decode_error)
    else:
        assert "decode_error" not in meta
    assert meta["response_bytes"] == len(body)
    if text == SSE.decode():
        assert meta["stream_complete"] is True
    elif ctype == "text/event-stream":
        assert meta["stream_complete"] is False and trace["error"].startswith("stream ended by the upstream")


def test_bytes_that_are_not_utf8_in_headers_and_json_escapes(proxy_r, raw_upstream, r4u, tag):
    """Header bytes that are not UTF-8 (obs-text, e.g. latin-1) and JSON with lone surrogate
    escapes. Outcome: the client gets the header bytes untouched; the trace has U+FFFD in their
    place and is valid UTF-8 JSON: no lone surrogates, which R4U's parser (pydantic) refuses
    ("lone leading surrogate") and no database can store."""
    body = b'{"object":"chat.completion","model":"gpt-4o\\ud83d","choices":[],"error":{"message":"bad \\udfff"}}'
    key = uuid.uuid4().hex
    raw_upstream.answers[key] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd: caf\xe9 \xff\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    status, headers, got = post(proxy_r, tag, x_raw=key, headers={"X-R4U-Note": b"caf\xe9", "x-custom": b"\xff"})
    assert (status, got) == (200, body)
    assert dict(headers.raw)[b"X-Odd"] == b"caf\xe9 \xff"
    assert raw_upstream.requests[-1]["headers"]["x-custom"] == "\xff"  # latin-1 decoded by RawUpstream
    (trace,) = traces_for(r4u, tag)
    json.dumps(trace, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    assert trace["response_headers"]["x-odd"] == "caf\ufffd \ufffd"
    assert trace["request_headers"]["x-custom"] == "\ufffd"
    assert trace["metadata"]["properties"]["note"] == "caf\ufffd"
    assert trace["metadata"]["model"] == "gpt-4o\ufffd"
    assert trace["response"] == body.decode()


def big_sse(n: int = 3000) -> bytes:
    """An event stream that compresses poorly (random base64 content): ~600 KB, ~450 KB gzipped."""
    import random
    rng = random.Random(7)
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n'
              % base64.b64encode(rng.randbytes(150)) for _ in range(n)]
    return b"".join(events) + b"data: [DONE]\n\n"


def garbled(good: bytes, at: float) -> bytes:
    cut = int(len(good) * at)
    return good[:cut] + b"\xff\x00 this is not deflate data \x13\x37" * 20


@pytest.mark.parametrize("ctype", ["text/event-stream", "application/json"])
def test_gzip_that_turns_to_garbage(proxy_r, raw_upstream, r4u, tag, ctype):
    """Outcome: the client gets the bytes; the trace keeps what decoded before the garbage, so it
    starts with most of the real body, and says `corrupt gzip stream` (or `truncated gzip
    stream`: deflate has no checksum before its end, so garbage may decode as more deflate data
    until the body ends)."""
    sse = big_sse()
    body = garbled(gzip_bytes(sse), 0.7)
    key = uuid.uuid4().hex
    raw_upstream.answers[key] = http_response("200 OK", [("Content-Type", ctype), ("Content-Encoding", "gzip")], body)
    status, _, got = post(proxy_r, tag, x_raw=key)
    assert (status, got) == (200, body)
    (trace,) = traces_for(r4u, tag)
    assert len(os.path.commonprefix([trace["response"], sse.decode()])) > len(sse) // 2
    assert trace["metadata"]["decode_error"].startswith(("corrupt gzip stream", "truncated gzip stream"))


def test_small_gzip_that_turns_to_garbage(proxy_r, raw_upstream, r4u, tag):
    """A body whose whole compressed form is one decompress call: zlib rejects the call at the
    garbage, and what it decoded before (222 bytes of 2,913 here: deflate's output lags its
    input) is still the trace's text, not the compressed bytes taken for a lie."""
    body = garbled(gzip_bytes(SSE), 0.5)
    key = uuid.uuid4().hex
    raw_upstream.answers[key] = http_response("200 OK", [("Content-Type", "application/json"),
                                                         ("Content-Encoding", "gzip")], body)
    assert post(proxy_r, tag, x_raw=key)[2] == body
    (trace,) = traces_for(r4u, tag)
    assert len(os.path.commonprefix([trace["response"], SSE.decode()])) >= 222
    assert trace["metadata"]["decode_error"].startswith("corrupt gzip stream")


# -- limits: bombs, big bodies ------------------------------------------------------------------------

BOMB = 1024 ** 3  # decoded size: 1 GiB of spaces


def bomb(coding: str) -> bytes:
    block = b" " * (1024 * 1024)
    if coding == "gzip":  # 1024 gzip members of 1 MiB each (RFC 1952 §2.2): quick to make
        return gzip_bytes(block) * (BOMB // len(block))
    if coding == "br":
        c = brotli.Compressor(quality=1)
        return b"".join([c.process(block) for _ in range(BOMB // len(block))] + [c.finish()])
    c = zstd.ZstdCompressor(level=1)
    return b"".join([c.compress(block) for _ in range(BOMB // len(block))] + [c.flush()])


@pytest.mark.parametrize("coding, ctype", [("gzip", "application/json"), ("br", "text/event-stream"),
                                           ("zstd", "application/json"), ("gzip", "text/event-stream")])
def test_compression_bomb_memory_stays_bounded(proxy_r, raw_upstream, r4u, tag, coding, ctype):
    """Outcome: the client gets the compressed bytes; the trace keeps exactly the first
    r4u_max_body_bytes of the 1 GiB it decodes to, marked `truncated`; mitmdump's peak memory
    grows by far less than the decoded size."""
    body = bomb(coding)
    key = uuid.uuid4().hex
    raw_upstream.answers[key] = http_response("200 OK", [("Content-Type", ctype), ("Content-Encoding", coding)], body)
    rss_before = peak_rss_mb(proxy_r)
    status, _, got = post(proxy_r, tag, x_raw=key)
    assert status == 200 and got == body
    (trace,) = traces_for(r4u, tag, timeout=30)
    meta = trace["metadata"]
    assert trace["response"] == " " * LIMIT
    assert meta["truncated"] is True and "decode_error" not in meta
    if ctype == "text/event-stream":
        assert meta["stream"] is True and meta["stream_complete"] is None and trace["error"] is None
    else:
        assert meta["stream"] is False and trace["error"] is None
    grown = peak_rss_mb(proxy_r) - rss_before
    print(f"peak RSS grew by {grown:.1f} MB")
    assert grown < 200, f"decoding is not bounded: peak RSS grew by {grown:.0f} MB"


@pytest.mark.parametrize("x_fake, stream", [("synth=12000", True), ("synth=12000;encoding=gzip", True),
                                            ("synth=12000;content_type=application/json", False)])
def test_a_body_over_the_limit(proxy_f, files_upstream, r4u, tag, x_fake, stream):
    """Outcome: the client gets everything; the trace keeps the first r4u_max_body_bytes (decoded),
    says `truncated`, and leaves completeness unknown."""
    status, _, body = post(proxy_f, tag, x_fake=x_fake + ";chunk=16384")
    sent = served(files_upstream)
    assert status == 200 and len(sent["response_body"]) > 2 * LIMIT
    assert hashlib.sha256(body if "gzip" not in x_fake else zlib.decompress(body, 31)).hexdigest() == sent["response_sha256"]
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert trace["response"] == sent["response_body"][:LIMIT].decode("utf-8", "replace")
    assert meta["truncated"] is True and meta["stream"] is stream
    assert meta["stream_complete"] is None and trace["error"] is None
    assert meta["response_bytes"] == sent["wire_bytes"]


# -- uploads -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["files", "transcription"])
def test_binary_upload_becomes_a_placeholder(proxy_f, files_upstream, r4u, tag, what, monkeypatch):
    """Outcome: the multipart request is traced as `[binary N bytes, multipart/form-data]`; the
    upstream gets every byte (here it answers 400: the fake only takes JSON)."""
    for key, value in proxy_f.client_env().items():
        monkeypatch.setenv(key, value)
    sdk = openai.OpenAI(api_key=SECRET, max_retries=0)
    blob = os.urandom(50_000) + b"\x00\xff" * 1000
    with pytest.raises(openai.BadRequestError):
        if what == "files":
            sdk.files.create(file=("batch.jsonl", blob, "application/jsonl"), purpose="batch",
                             extra_headers={"X-R4U-Test": tag})
        else:
            sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", blob, "audio/wav"),
                                            extra_headers={"X-R4U-Test": tag})
    sent = served(files_upstream)
    assert blob in sent["body"]
    (trace,) = traces_for(r4u, tag)
    assert trace["request"] == f"[binary {len(sent['body'])} bytes, multipart/form-data]"
    assert trace["request_path"] == ("/v1/files" if what == "files" else "/v1/audio/transcriptions")
    assert trace["status_code"] == 400 and trace["error"].startswith("HTTP 400: ")
    assert_no_secret(trace)


# -- WebSocket -------------------------------------------------------------------------------------------

def test_websocket_upgrade_passes_through(proxy_r, raw_upstream, r4u, tag):
    """An OpenAI Realtime-style WebSocket (wss://api.openai.com/v1/realtime) through the proxy.
    Outcome: the upgrade and the messages go through untouched both ways; the addon does not
    fail, and traces the handshake only (status 101, empty bodies, no frame bytes, secrets
    redacted); the messages themselves are not traced."""
    sock = socket.create_connection(("127.0.0.1", proxy_r.port), timeout=10)
    sock.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    assert sock.recv(1000).startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(proxy_r.ca_file))
    ctx.set_alpn_protocols(["http/1.1"])
    tls = ctx.wrap_socket(sock, server_hostname="api.openai.com")
    key = base64.b64encode(os.urandom(16)).decode()
    tls.sendall((f"GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1\r\nHost: api.openai.com\r\n"
                 f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {SECRET}\r\nOpenAI-Beta: realtime=v1\r\n"
                 f"X-R4U-Test: {tag}\r\n\r\n").encode())
    reader = _Reader(tls)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += reader.read(1)
    assert head.startswith(b"HTTP/1.1 101")
    expected = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC11B46").digest())
    assert b"Sec-WebSocket-Accept: " + expected in head
    messages = [json.dumps({"type": "session.update", "session": {"instructions": "Réponds en français ✓"}}).encode(),
                os.urandom(300), b"x" * 70_000]
    for i, message in enumerate(messages):
        tls.sendall(frame(2 if i == 1 else 1, message, mask=os.urandom(4)))
        assert read_frame(reader) == (2 if i == 1 else 1, message)
    tls.sendall(frame(8, struct.pack("!H", 1000), mask=os.urandom(4)))
    assert read_frame(reader)[0] == 8
    tls.close()
    assert raw_upstream.ws_messages[-3:] == messages
    assert raw_upstream.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert "x-r4u-test" not in raw_upstream.requests[-1]["headers"]

    (trace,) = traces_for(r4u, tag)
    assert trace["status_code"] == 101 and trace["request_path"] == "/v1/realtime"
    assert trace["request"] == "" and trace["response"] == ""
    assert trace["request_headers"]["authorization"] == "[REDACTED]"
    assert trace["metadata"]["stream"] is False
    assert_no_secret(trace)


# -- many streams at once --------------------------------------------------------------------------------

class _H2First(ssl.SSLContext):
    """httpx offers ALPN http/1.1 first through a proxy tunnel, and mitmproxy honours the
    client's order: list h2 first, as h2-preferring clients do."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


@pytest.mark.parametrize("http2", [False, True], ids=["http1-200-connections", "http2-one-connection"])
def test_200_concurrent_streams_all_arrive_whole_and_are_all_traced(proxy_f, r4u, tag, http2):
    """Outcome: 200 streams at once through one mitmdump (200 HTTP/1.1 connections, or 200
    streams multiplexed on one HTTP/2 connection): every client gets its whole stream, and R4U
    gets exactly 200 complete traces."""
    n = 200

    async def one(client: httpx.AsyncClient, i: int) -> bytes:
        async with client.stream("POST", CHAT_URL, json={"model": "gpt-4o-mini", "stream": True},
                                 headers={"X-R4U-Test": tag, "x-fake": "synth=20;delay_ms=10",
                                          "authorization": f"Bearer {SECRET}", "x-n": str(i)}) as r:
            assert r.status_code == 200 and r.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            return b"".join([piece async for piece in r.aiter_raw()])

    async def run() -> list[bytes]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        context = _H2First(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(proxy_f.ca_file))
        async with httpx.AsyncClient(proxy=proxy_f.url, verify=context, limits=limits, http2=http2,
                                     timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(n)))

    bodies = asyncio.run(run())
    traces = traces_for(r4u, tag, n, timeout=90)
    # synth streams differ only in `created` (a timestamp): compare with `created` masked.
    import re
    masked = {re.sub(rb'"created":\d+', b'"created":0', b) for b in bodies}
    assert len(masked) == 1 and (expected := masked.pop()).endswith(b"data: [DONE]\n\n")
    assert all(t["metadata"]["stream_complete"] is True and t["error"] is None for t in traces)
    assert {t["metadata"]["events"] for t in traces} == {23}
    assert {re.sub(r'"created":\d+', '"created":0', t["response"]) for t in traces} == {expected.decode()}
    assert len({t["metadata"]["trace_id"] for t in traces}) == n
