"""Self-test of the fake upstream (tests/fakes/upstream.py): real sockets, real TLS, the real openai SDK.

No timing assertions: only bytes, framing and what the SDK makes of them.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import zlib
from pathlib import Path

import brotli
import httpx2
import openai
import pytest
from openai._streaming import SSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from tests.fakes.upstream import FakeUpstream, _rechunk, get_header, split_events, synth_text

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake():
    f = FakeUpstream().start()
    yield f
    f.stop()


@pytest.fixture
def client(fake):
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="sk-test", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=fake.ssl_context())) as c:
        yield c


@pytest.fixture
def http(fake):
    with httpx2.Client(verify=fake.ssl_context(), timeout=10) as c:
        yield c


def stream_file(fake, rel: str) -> bytes:
    return (fake.streams_dir / rel).read_bytes()


def chat_oracle(raw: bytes) -> dict:
    """What the SDK's own accumulator makes of a chat stream (facts §6)."""
    state = ChatCompletionStreamState()
    for sse in SSEDecoder().iter_bytes(iter([raw])):
        if sse.data.startswith("[DONE]"):
            break
        chunk = json.loads(sse.data)
        if chunk.get("object") != "chat.completion.chunk":
            continue
        state.handle_chunk(ChatCompletionChunk.construct(**chunk))
    return state.current_completion_snapshot.to_dict()


def last(fake) -> dict:
    return fake.wait(len(fake.requests))[-1]


def read_raw_response(fake, path: str, x_fake: str, body: bytes = b"{}") -> tuple[bytes, bytes]:
    """Send one request over a raw TLS socket; return (head, everything after the head until EOF)."""
    ctx = ssl.create_default_context(cafile=fake.cert_file)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="api.openai.com") as s:
            s.sendall(b"POST %s HTTP/1.1\r\nHost: api.openai.com\r\nx-fake: %s\r\nConnection: close\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (path.encode(), x_fake.encode(), len(body), body))
            data = b""
            while True:
                try:
                    got = s.recv(65536)
                except (ssl.SSLEOFError, ConnectionResetError):
                    break
                if not got:
                    break
                data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def parse_chunked(rest: bytes) -> tuple[list[bytes], bool]:
    """Split a chunked body into its chunks; second value: the terminating 0-chunk was seen."""
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks, True
        chunks.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    return chunks, False


# ------------------------------------------------------------------------------------------------- TLS

def test_tls_cert_covers_provider_hosts(fake):
    for strict in (False, True):
        ctx = ssl.create_default_context(cafile=fake.cert_file)
        if strict:
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        for host in ("api.openai.com", "myres.openai.azure.com", "api.anthropic.com", "localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as s:
                    assert s.version() in ("TLSv1.2", "TLSv1.3")
    # and an untrusting client is refused
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(fake.url + "/v1/models")


# ---------------------------------------------------------------------------------- default routes, SDK

def test_chat_json(fake, client):
    expected = chat_oracle(stream_file(fake, "openai_chat/basic.sse"))["choices"][0]["message"]["content"]
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    rec = last(fake)
    assert rec["status"] == 200 and rec["complete"] and not rec["cut"]
    assert json.loads(rec["response_body"])["id"] == r.id
    assert json.loads(rec["body"])["model"] == "gpt-4o-mini"
    assert get_header(rec["headers"], "authorization") == "Bearer sk-test"
    # realistic headers
    rh = rec["response_headers"]
    assert get_header(rh, "x-request-id").startswith("req_") and len(get_header(rh, "x-request-id")) == 36
    for h in ("openai-processing-ms", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "date"):
        assert get_header(rh, h)
    assert get_header(rh, "openai-version") == "2020-10-01"
    assert get_header(rh, "set-cookie").startswith("__cf_bm=")
    assert "; path=/; HttpOnly" in get_header(rh, "set-cookie")


def test_chat_json_tools_and_n(fake, client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "w"}], tools=tools)
    calls = r.choices[0].message.tool_calls
    oracle = chat_oracle(stream_file(fake, "openai_chat/tool_calls_parallel.sse"))["choices"][0]["message"]
    assert [c.function.arguments for c in calls] == [c["function"]["arguments"] for c in oracle["tool_calls"]]
    assert len(calls) == 2 and all(c.id.startswith("call_") for c in calls)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], n=2)
    assert [c.index for c in r.choices] == [0, 1]
    r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], n=3)
    assert len(r.choices) == 3


@pytest.mark.parametrize("kwargs, rel", [
    ({}, "openai_chat/basic.sse"),
    ({"stream_options": {"include_usage": True}}, "openai_chat/include_usage.sse"),
    ({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]},
     "openai_chat/tool_calls_parallel.sse"),
    ({"n": 2}, "openai_chat/n2_interleaved.sse"),
])
def test_chat_stream(fake, client, kwargs, rel):
    raw = stream_file(fake, rel)
    expected = chat_oracle(raw)
    with client.chat.completions.stream(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                        **kwargs) as s:
        for _ in s:
            pass
        snap = s.current_completion_snapshot
    assert [c.message.content for c in snap.choices] == [c["message"]["content"] for c in expected["choices"]]
    if "stream_options" in kwargs:
        assert snap.usage is not None and snap.usage.total_tokens == expected["usage"]["total_tokens"]
    rec = last(fake)
    assert rec["response_body"] == raw
    assert rec["writes"] == len(split_events(raw))
    assert get_header(rec["response_headers"], "content-type") == "text/event-stream; charset=utf-8"
    assert get_header(rec["response_headers"], "transfer-encoding") == "chunked"


def test_chat_stream_raw_create(fake, client):
    text = "".join(c.choices[0].delta.content or "" for c in
                   client.chat.completions.create(model="gpt-4o", messages=[], stream=True) if c.choices)
    assert text == chat_oracle(stream_file(fake, "openai_chat/basic.sse"))["choices"][0]["message"]["content"]


def test_responses(fake, client):
    r = client.responses.create(model="gpt-4o", input="Fuji?")
    assert r.status == "completed" and r.output_text == "Mount Fuji is 3,776 m — Japan's highest."
    assert r.usage.total_tokens == 28
    with client.responses.stream(model="gpt-4o", input="Fuji?") as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "Mount Fuji is 3,776 m — Japan's highest."
    assert last(fake)["response_body"] == stream_file(fake, "openai_responses/text.sse")
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    with client.responses.stream(model="gpt-4.1", input="w", tools=tools) as s:
        final = s.get_final_response()
    assert [o.type for o in final.output] == ["function_call", "function_call"]
    r = client.responses.create(model="gpt-4.1", input="w", tools=tools)
    assert [o.name for o in r.output] == [o.name for o in final.output]


def test_completions(fake, client):
    raw = stream_file(fake, "openai_completions/basic.sse")
    text = "".join(c.choices[0].text for c in
                   client.completions.create(model="davinci-002", prompt="A story:", stream=True)
                   if c.choices)
    r = client.completions.create(model="davinci-002", prompt="A story:")
    assert r.choices[0].text == text == "\nOnce there was a lighthouse"
    assert r.choices[0].finish_reason == "length"
    assert fake.wait(len(fake.requests))[-2]["response_body"] == raw


def test_embeddings(fake, client):
    r = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])  # SDK asks base64
    sent = json.loads(last(fake)["body"])
    assert sent["encoding_format"] == "base64"
    assert [d.index for d in r.data] == [0, 1, 2]
    assert all(len(d.embedding) == 1536 and isinstance(d.embedding[0], float) for d in r.data)
    f = client.embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"], encoding_format="float")
    assert [d.embedding for d in f.data] == [d.embedding for d in r.data]      # same float32 values
    one = client.embeddings.create(model="text-embedding-3-large", input="hello", dimensions=256)
    assert len(one.data) == 1 and len(one.data[0].embedding) == 256


def test_models_and_404(fake, client):
    ids = [m.id for m in client.models.list()]
    assert "gpt-4o-mini" in ids
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as e:
        client.post("/nope", body={}, cast_to=object)
    assert e.value.body["message"] == "Invalid URL (POST /v1/nope)"


def test_azure(fake):
    with openai.AzureOpenAI(azure_endpoint=fake.url, api_version="2024-10-21", api_key="k", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=fake.ssl_context())) as c:
        raw = stream_file(fake, "azure_chat/content_filter_results.sse")
        expected = chat_oracle(raw)["choices"][0]["message"]["content"]
        chunks = list(c.chat.completions.create(model="my-deploy", messages=[], stream=True))
        assert chunks[0].object == "" and chunks[0].choices == []         # the prompt-filter frame
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
        rec = last(fake)
        assert rec["path"] == "/openai/deployments/my-deploy/chat/completions?api-version=2024-10-21"
        assert rec["response_body"] == raw
        r = c.chat.completions.create(model="my-deploy", messages=[])
        assert r.choices[0].message.content == expected
        body = last(fake)["response_body"]
        assert list(json.loads(body)) == sorted(json.loads(body))           # Azure sorts keys


def test_anthropic(fake, http):
    r = http.post(fake.url + "/v1/messages", json={"model": "claude-sonnet-4-5", "max_tokens": 100,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    msg = r.json()
    assert msg["type"] == "message" and msg["stop_reason"] == "end_turn"
    assert msg["content"][0]["text"] == "Hi! The Nile is roughly 6,650 km long."
    r = http.post(fake.url + "/v1/messages", json={"model": "c", "max_tokens": 9, "messages": [], "stream": True})
    assert r.content == stream_file(fake, "anthropic/text.sse")
    r = http.post(fake.url + "/v1/messages", json={"model": "c", "max_tokens": 9, "messages": []},
                  headers={"x-fake": "status=529"})
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


# ---------------------------------------------------------------------------------------- x-fake: bytes

def test_random_chunks_reassemble_exactly(fake, http):
    for rel in ("openai_chat/basic.sse", "framing/crlf.sse", "framing/split_utf8.sse", "anthropic/thinking.sse"):
        raw = stream_file(fake, rel)
        with http.stream("POST", fake.url + "/v1/chat/completions", json={},
                         headers={"x-fake": f"stream={rel}; chunk=random:7"}) as r:
            got = b"".join(r.iter_raw())
        assert got == raw
        rec = last(fake)
        assert rec["response_body"] == raw and sum(rec["write_sizes"]) == len(raw)
        assert rec["writes"] > len(split_events(raw))


def test_random_chunks_split_the_hard_places():
    body = ("data: {\"content\":\"naïve café 日本語 😊\"}\r\n\r\n" * 20).encode()
    for seed in range(5):
        pieces = list(_rechunk([body], f"random:{seed}"))
        assert b"".join(pieces) == body
        assert pieces == list(_rechunk(split_events(body), f"random:{seed}"))   # input cuts don't matter
        ends = [p[-1] for p in pieces[:-1]]
        assert any(e == 0x0D for e in ends), "a cut between CR and LF"
        assert any(p[0] & 0xC0 == 0x80 for p in pieces[1:]), "a cut inside a UTF-8 sequence"
        assert max(len(p) for p in pieces) <= 64
    assert list(_rechunk([body], "10")) == [body[i:i + 10] for i in range(0, len(body), 10)]


def test_chunks_on_the_wire_match_writes(fake):
    raw = stream_file(fake, "openai_chat/basic.sse")
    head, rest = read_raw_response(fake, "/v1/chat/completions", "stream=openai_chat/basic.sse;chunk=100")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    chunks, terminated = parse_chunked(rest)
    assert terminated and b"".join(chunks) == raw
    assert [len(c) for c in chunks] == last(fake)["write_sizes"] == [100] * (len(raw) // 100) + [len(raw) % 100]
    _, rest = read_raw_response(fake, "/v1/chat/completions", "stream=openai_chat/basic.sse")
    chunks, _ = parse_chunked(rest)
    assert chunks == split_events(raw)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("chunk", ["event", "random:3"])
def test_encodings_decode_to_the_file(fake, http, encoding, chunk):
    rel = "openai_responses/text.sse"
    raw = stream_file(fake, rel)
    r = http.post(fake.url + "/v1/responses", json={}, headers={"x-fake": f"stream={rel};encoding={encoding};"
                                                                         f"chunk={chunk}"})
    assert r.headers["content-encoding"] == encoding
    assert r.content == raw
    rec = last(fake)
    assert rec["response_body"] == raw and rec["wire_bytes"] < len(raw)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_encoded_writes_decode_on_arrival(fake, encoding):
    """Each chunk on the wire decodes on its own to its event: the fake flushes after every write."""
    raw = stream_file(fake, "openai_chat/basic.sse")
    head, rest = read_raw_response(fake, "/v1/chat/completions",
                                   f"stream=openai_chat/basic.sse;encoding={encoding}")
    assert f"Content-Encoding: {encoding}".encode() in head
    chunks, terminated = parse_chunked(rest)
    assert terminated
    d = {"gzip": zlib.decompressobj(31), "deflate": zlib.decompressobj(15)}.get(encoding)
    if encoding == "br":
        dec = brotli.Decompressor().process
    elif encoding == "zstd":
        dec = zstd.ZstdDecompressor().decompress
    else:
        dec = d.decompress
    assert [dec(c) for c in chunks] == split_events(raw)


def test_cut_after(fake, http):
    raw = stream_file(fake, "openai_chat/basic.sse")
    events = split_events(raw)
    got = b""
    with pytest.raises(httpx2.RemoteProtocolError):
        with http.stream("POST", fake.url + "/v1/chat/completions", json={},
                         headers={"x-fake": "stream=openai_chat/basic.sse;cut_after=3"}) as r:
            for piece in r.iter_raw():
                got += piece
    assert got == b"".join(events[:3])
    rec = last(fake)
    assert rec["cut"] and not rec["complete"] and rec["writes"] == 3
    assert rec["response_body"] == b"".join(events[:3])
    # on the wire: three chunks and no terminator
    _, rest = read_raw_response(fake, "/v1/chat/completions", "stream=openai_chat/basic.sse;cut_after=3")
    chunks, terminated = parse_chunked(rest)
    assert chunks == events[:3] and not terminated
    # the SDK sees an error too, after the first events
    with openai.OpenAI(base_url=fake.url + "/v1", api_key="k", max_retries=0,
                       http_client=openai.DefaultHttpxClient(verify=fake.ssl_context())) as c:
        seen = []
        with pytest.raises((openai.APIError, httpx2.HTTPError)):
            for ch in c.chat.completions.create(model="m", messages=[], stream=True,
                                                extra_headers={"x-fake": "stream=openai_chat/basic.sse;"
                                                                         "cut_after=4;chunk=event"}):
                seen.append(ch)
        assert len(seen) == 4
    # cut with compression and length framing
    with pytest.raises(httpx2.RemoteProtocolError):
        http.post(fake.url + "/v1/chat/completions", json={},
                  headers={"x-fake": "stream=openai_chat/basic.sse;cut_after=2;encoding=gzip;framing=length"})
    assert last(fake)["response_body"] == b"".join(events[:2])
    # no cut when the body has no more writes than that
    r = http.post(fake.url + "/v1/chat/completions", json={},
                  headers={"x-fake": f"stream=openai_chat/basic.sse;cut_after={len(events)}"})
    assert r.content == raw and not last(fake)["cut"]


@pytest.mark.parametrize("framing", ["length", "close", "chunked"])
def test_framing(fake, http, framing):
    raw = stream_file(fake, "openai_chat/include_usage.sse")
    r = http.post(fake.url + "/v1/chat/completions", json={},
                  headers={"x-fake": f"stream=openai_chat/include_usage.sse;framing={framing};delay_ms=1"})
    assert r.content == raw
    assert ("content-length" in r.headers) == (framing == "length")
    assert ("transfer-encoding" in r.headers) == (framing == "chunked")
    assert r.headers["connection"] == ("close" if framing == "close" else "keep-alive")
    if framing == "length":
        assert int(r.headers["content-length"]) == len(raw)
    rec = last(fake)
    assert rec["complete"] and rec["write_times"] == sorted(rec["write_times"])


def test_json_framing_and_chunking(fake, http):
    r = http.get(fake.url + "/v1/models", headers={"x-fake": "framing=chunked;chunk=5;encoding=gzip"})
    assert r.json()["object"] == "list" and r.headers["transfer-encoding"] == "chunked"
    assert last(fake)["write_sizes"][0] == 5


def test_keep_alive(fake, http):
    http.get(fake.url + "/v1/models")
    http.post(fake.url + "/v1/chat/completions", json={"stream": True})
    a, b = fake.wait(len(fake.requests))[-2:]
    assert a["conn"] == b["conn"]


def test_chunked_request_body(fake, http):
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "é" * 3000}]}).encode()
    r = http.post(fake.url + "/v1/chat/completions", content=iter([body[:1000], body[1000:]]),
                  headers={"content-type": "application/json"})
    assert r.status_code == 200
    rec = last(fake)
    assert get_header(rec["headers"], "transfer-encoding") == "chunked" and rec["body"] == body


# ---------------------------------------------------------------------------------------- x-fake: errors

def test_status_errors(fake, client):
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="m", messages=[], extra_headers={"x-fake": "status=429"})
    assert e.value.code == "rate_limit_exceeded" and e.value.response.headers["retry-after"] == "0"
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="m", messages=[], stream=True, extra_headers={"x-fake": "status=500"})
    assert e.value.type == "server_error"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="m", messages=[], extra_headers={"x-fake": "body=nonjson"})
    assert e.value.status_code == 502 and e.value.response.text == "error code: 502"
    assert e.value.response.headers["content-type"].startswith("text/plain")
    assert last(fake)["status"] == 502


def test_bad_x_fake_is_refused(fake, http):
    for bad in ("nope=1", "chunk=weird", "delay_ms=x", "stream=../../etc/passwd", "stream=missing.sse"):
        r = http.post(fake.url + "/v1/chat/completions", json={}, headers={"x-fake": bad})
        assert r.status_code == 400 and r.json()["error"]["type"] == "fake_error", bad


def test_error_midstream_file_reaches_the_sdk(client):
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="m", messages=[], stream=True,
                                                extra_headers={"x-fake": "stream=openai_chat/error_midstream.sse"}):
            pass


# ---------------------------------------------------------------------------------------------- synth

def test_synth(fake, client):
    with client.chat.completions.stream(model="gpt-4o-mini", messages=[],
                                        extra_headers={"x-fake": "synth=200;chunk=random:1"}) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == synth_text(200)
    assert final.model == "gpt-4o-mini-2024-07-18" and final.id.startswith("chatcmpl-")
    rec = last(fake)
    assert chat_oracle(rec["response_body"])["choices"][0]["message"]["content"] == synth_text(200)
    assert any(ord(ch) > 127 for ch in synth_text(20))
    with client.chat.completions.stream(model="gpt-4o", messages=[], stream_options={"include_usage": True},
                                        extra_headers={"x-fake": "synth=3;record=0"}) as s:
        final = s.get_final_completion()
    assert final.usage.completion_tokens == 3 and final.choices[0].message.content == synth_text(3)
    rec = last(fake)
    assert rec["response_body"] is None and rec["response_len"] > 0 and rec["writes"] == 3 + 4


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_plain():
    p = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstream", "--port", "0", "--plain"], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on ")
        port = int(line.split()[-1])
        r = httpx2.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert r.status_code == 200 and r.json()["data"]
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
