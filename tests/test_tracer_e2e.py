"""The whole path, for real: the openai SDK → mitmdump with the addon → fake OpenAI, and the
trace that reaches the fake R4U. Covers every endpoint, streams ended every way, and secrets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid

import openai
import pytest

from tests.conftest import SECRET, assert_no_secret, headers, stream_bytes, traces_for
from tests.harness import ROOT, Mitmdump, wait_for

KEPT = ROOT / "tests" / "fakes" / "kept.py"

CHAT = [{"role": "user", "content": "Say hello in French"}]


def chat_text(raw: bytes) -> str:
    """The assistant text of a data-only chat stream, read plainly (an oracle independent of ours)."""
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)


def check_common(trace: dict, path: str, method: str = "POST") -> None:
    assert trace["request_method"] == method
    assert trace["request_path"] == path
    assert trace["metadata"]["url"] == f"https://api.openai.com{path}"
    assert trace["metadata"]["provider"] == "openai"
    assert trace["request_headers"]["authorization"] == "[REDACTED]"
    assert trace["response_headers"]["set-cookie"] == "[REDACTED]"
    assert trace["response_headers"]["x-ratelimit-remaining-tokens"].isdigit()
    assert trace["metadata"]["upstream_request_id"].startswith("req_")
    assert trace["started_at"] <= trace["completed_at"]
    assert "x-r4u-test" not in trace["request_headers"]
    assert_no_secret(trace)


def test_chat_completion(openai_client, r4u, upstream, tag):
    completion = openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, extra_headers=headers(tag))
    (trace,) = traces_for(r4u, tag)
    check_common(trace, "/v1/chat/completions")
    assert trace["status_code"] == 200
    assert trace["error"] is None
    assert json.loads(trace["request"]) == {"model": "gpt-4o-mini", "messages": CHAT}
    assert json.loads(trace["response"])["choices"][0]["message"]["content"] == completion.choices[0].message.content
    meta = trace["metadata"]
    assert meta["stream"] is False and meta["stream_complete"] is None
    assert meta["model"] == completion.model
    assert meta["usage"]["total_tokens"] == completion.usage.total_tokens
    assert meta["finish_reason"] == completion.choices[0].finish_reason
    assert meta["response_bytes"] == len(trace["response"].encode())


def test_upstream_never_sees_r4u_tags(openai_client, r4u, upstream, tag):
    openai_client.models.list(extra_headers={**headers(tag), "X-R4U-Session": "s-1", "X-R4U-User": "ada"})
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["properties"] == {"test": tag, "session": "s-1", "user": "ada"}
    sent = [r for r in upstream.requests if any(v == tag for _, v in r["headers"])]
    assert sent == []  # every X-R4U-* header was removed before the request went upstream


@pytest.mark.parametrize("name", [
    "openai_chat/basic.sse", "openai_chat/include_usage.sse", "openai_chat/n2_interleaved.sse",
    "openai_chat/tool_calls_parallel.sse", "openai_chat/refusal.sse", "openai_chat/logprobs.sse",
    "azure_chat/content_filter_results.sse",
])
def test_chat_stream_is_traced_whole_and_app_gets_same_bytes(openai_client, r4u, tag, name):
    raw = stream_bytes(name)
    with openai_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, stream=name, chunk="random:7"),
    ) as response:
        received = b"".join(response.iter_bytes())
    assert received == raw
    (trace,) = traces_for(r4u, tag)
    check_common(trace, "/v1/chat/completions")
    assert trace["response"] == raw.decode()
    assert trace["error"] is None
    meta = trace["metadata"]
    assert meta["stream"] is True and meta["stream_complete"] is True
    assert meta["events"] == raw.count(b"\n\n")
    assert meta["response_bytes"] == len(raw)
    assert meta["ttft_ms"] is not None and meta["ttfb_ms"] <= meta["ttft_ms"] <= meta["duration_ms"]


def test_a_stream_of_megabytes_is_traced_whole(openai_client, r4u, tag):
    """Stored from its pieces a slice at a time, never joined in the proxy: the trace is the
    stream the app got, byte for byte."""
    with openai_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, synth=20000),
    ) as response:
        received = b"".join(response.iter_bytes())
    assert len(received) > 4 * 1024 * 1024 and received.endswith(b"data: [DONE]\n\n")
    (trace,) = traces_for(r4u, tag, timeout=60)
    assert trace["response"] == received.decode()
    meta = trace["metadata"]
    assert meta["stream_complete"] is True and meta["events"] == received.count(b"\n\n") == 20003
    assert meta["response_bytes"] == len(received)


def test_sdk_stream_hangs_up_after_done_and_trace_is_complete(openai_client, r4u, tag):
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, stream="openai_chat/basic.sse"),
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == chat_text(stream_bytes("openai_chat/basic.sse"))
    (trace,) = traces_for(r4u, tag)
    assert trace["error"] is None
    assert trace["metadata"]["stream_complete"] is True
    assert chat_text(trace["response"].encode()) == text


def test_async_client_stream(async_openai_client, r4u, tag):
    async def run() -> str:
        stream = await async_openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, stream=True, stream_options={"include_usage": True},
            extra_headers=headers(tag),
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    text = asyncio.run(run())
    (trace,) = traces_for(r4u, tag)
    assert chat_text(trace["response"].encode()) == text
    assert trace["metadata"]["usage"]["total_tokens"] > 0
    assert json.loads(trace["request"])["stream_options"] == {"include_usage": True}


def test_stream_helper_with_tools(openai_client, r4u, tag):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    with openai_client.chat.completions.stream(
        model="gpt-4o-mini", messages=CHAT, tools=tools, extra_headers=headers(tag),
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) == 2
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["finish_reason"] == "tool_calls"
    assert trace["metadata"]["stream_complete"] is True
    assert trace["response"] == stream_bytes("openai_chat/tool_calls_parallel.sse").decode()


def test_responses_api_stream_and_not(openai_client, r4u, tag):
    with openai_client.responses.stream(model="gpt-4.1", input="hi", extra_headers=headers(tag)) as stream:
        final = stream.get_final_response()
    created = openai_client.responses.create(model="gpt-4.1", input="hi", extra_headers=headers(tag))
    streamed, plain = sorted(traces_for(r4u, tag, 2), key=lambda t: not t["metadata"]["stream"])
    check_common(streamed, "/v1/responses")
    assert streamed["response"] == stream_bytes("openai_responses/text.sse").decode()
    assert streamed["metadata"]["stream_complete"] is True
    assert streamed["metadata"]["finish_reason"] == "completed"
    assert streamed["metadata"]["usage"]["total_tokens"] == final.usage.total_tokens
    assert plain["metadata"]["stream"] is False
    assert json.loads(plain["response"])["id"] == created.id


def test_legacy_completions_embeddings_models(openai_client, r4u, tag):
    stream = openai_client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say", stream=True,
                                              extra_headers=headers(tag))
    text = "".join(c.choices[0].text for c in stream if c.choices)
    openai_client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], extra_headers=headers(tag))
    models = openai_client.models.list(extra_headers=headers(tag))
    got = {t["request_path"]: t for t in traces_for(r4u, tag, 3)}
    assert got["/v1/completions"]["metadata"]["stream_complete"] is True
    assert text and text in "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in got["/v1/completions"]["response"].splitlines() if line.startswith("data: {")
    )
    emb = got["/v1/embeddings"]
    assert len(json.loads(emb["response"])["data"]) == 2 and emb["metadata"]["usage"]["prompt_tokens"] > 0
    check_common(got["/v1/models"], "/v1/models", "GET")
    assert got["/v1/models"]["request"] == ""
    assert [m["id"] for m in json.loads(got["/v1/models"]["response"])["data"]] == [m.id for m in models.data]


@pytest.mark.parametrize("status, exc", [(429, openai.RateLimitError), (500, openai.InternalServerError)])
def test_error_answers(openai_client, r4u, tag, status, exc):
    with pytest.raises(exc):
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                              extra_headers=headers(tag, status=status))
    (trace,) = traces_for(r4u, tag)
    assert trace["status_code"] == status
    assert trace["error"].startswith(f"HTTP {status}")
    assert json.loads(trace["response"])["error"]["message"] in trace["error"]


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", "deflate"])
def test_compressed_answers_are_traced_as_text(openai_client, r4u, tag, encoding):
    completion = openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                                       extra_headers=headers(tag, encoding=encoding))
    name = "openai_chat/basic.sse"
    stream = openai_client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                                   extra_headers=headers(tag, stream=name, encoding=encoding))
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    plain, streamed = sorted(traces_for(r4u, tag, 2), key=lambda t: t["metadata"]["stream"])
    assert plain["response_headers"]["content-encoding"] == encoding
    assert json.loads(plain["response"])["id"] == completion.id
    assert streamed["response"] == stream_bytes(name).decode()
    assert chat_text(streamed["response"].encode()) == text
    assert streamed["metadata"]["stream_complete"] is True


def test_client_aborts_mid_stream(openai_client, r4u, tag):
    name = "openai_chat/basic.sse"
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, stream=name, delay_ms=150),
    )
    seen = [next(iter(stream)) for _ in range(3)]
    stream.close()
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["stream_complete"] is False
    assert trace["error"].startswith("client aborted")
    events = [e for e in trace["response"].split("\n\n") if e]
    assert 3 <= len(events) < stream_bytes(name).count(b"\n\n")
    assert stream_bytes(name).decode().startswith(trace["response"])
    assert seen[0].id in trace["response"]


def test_upstream_cuts_the_stream(openai_client, r4u, tag):
    name = "openai_chat/basic.sse"
    with pytest.raises(Exception):
        stream = openai_client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, stream=name, cut_after=4),
        )
        list(stream)
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert meta["stream_complete"] is False and meta["events"] == 4
    assert trace["error"] and "after 4 events" in trace["error"] and not trace["error"].startswith("client")
    assert trace["response"] == "\n\n".join(stream_bytes(name).decode().split("\n\n")[:4]) + "\n\n"


def test_close_delimited_stream_cut_before_done(openai_client, r4u, tag):
    """An upstream that ends a close-delimited body early looks like a normal end to HTTP."""
    raw = b"\n\n".join(stream_bytes("openai_chat/basic.sse").split(b"\n\n")[:5]) + b"\n\n"
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, stream=True,
        extra_headers=headers(tag, stream="openai_chat/basic.sse", framing="close", cut_after=5),
    )
    try:
        list(stream)
    except Exception:
        pass
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["stream_complete"] is False
    assert trace["error"].startswith("stream ended by the upstream before its terminal event, after 5 events")
    assert trace["response"] == raw.decode()


def test_slow_stream_timing_covers_the_whole_stream(openai_client, r4u, tag):
    name = "openai_chat/basic.sse"
    events = stream_bytes(name).count(b"\n\n")
    stream = openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, stream=True,
        extra_headers=headers(tag, stream=name, delay_ms=100, first_delay_ms=300),
    )
    list(stream)
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    # The fake waits 300 ms before the first write and 100 ms before each: the proxy saw that.
    assert meta["duration_ms"] >= 300 + 100 * (events - 1)
    assert meta["ttft_ms"] >= 300 + 100  # the first output is the second event
    assert meta["ttfb_ms"] <= meta["ttft_ms"] <= meta["duration_ms"]
    assert meta["events"] == events and meta["stream_complete"] is True
    from datetime import datetime
    span = datetime.fromisoformat(trace["completed_at"]) - datetime.fromisoformat(trace["started_at"])
    assert span.total_seconds() * 1000 >= 300 + 100 * (events - 1)


def test_other_hosts_and_skip_are_not_traced(app_env, r4u, tag):
    import httpx

    with httpx.Client(proxy=app_env.url, verify=str(app_env.ca_file)) as client:
        client.get("https://example.com/v1/models", headers={"X-R4U-Test": tag})
        client.get("https://api.openai.com/v1/models", headers={"X-R4U-Test": tag, "X-R4U-Skip": "1",
                                                              "Authorization": f"Bearer {SECRET}"})
        client.get("https://api.openai.com/v1/models", headers={"X-R4U-Test": tag})
    (trace,) = traces_for(r4u, tag)
    assert "authorization" not in trace["request_headers"]


def test_r4u_tags_never_go_upstream_even_from_hosts_not_traced(app_env, upstream):
    """An app tags every request the same way (the SDK's default_headers), whatever the host:
    a host that is not traced does not get the tags either."""
    import httpx

    test_id = uuid.uuid4().hex
    with httpx.Client(proxy=app_env.url, verify=str(app_env.ca_file)) as client:
        answer = client.get("https://example.com/v1/models",
                            headers={"X-R4U-Session": "s-1", "x-r4u-user": "ada", "x-test-id": test_id})
    assert answer.status_code == 200
    (sent,) = [[(k.lower(), v) for k, v in r["headers"]] for r in list(upstream.requests)
               if ("x-test-id", test_id) in [(k.lower(), v) for k, v in r["headers"]]]
    assert [k for k, _ in sent if k.startswith("x-r4u-")] == []
    assert ("host", "example.com") in sent  # it was the untraced host's request


def test_no_secret_anywhere(proxy, r4u):
    """Runs after the others in this module: nothing R4U got, logged or kept holds the key."""
    assert r4u.received
    assert_no_secret(r4u.received, proxy.log())
    for post in r4u.posts:
        assert_no_secret(str(post))


FRAMING = json.loads(stream_bytes("framing/EXPECTED.json"))


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_framing_cases_through_the_proxy_split_byte_by_byte(openai_client, r4u, tag, name):
    """CR/LF/CRLF, BOM, comments, split UTF-8, invalid UTF-8...: the app gets the bytes as sent,
    one byte per write, and the trace counts exactly the events a WHATWG parser dispatches."""
    raw = stream_bytes(f"framing/{name}")
    with openai_client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag, stream=f"framing/{name}", chunk=1),
    ) as response:
        assert b"".join(response.iter_bytes()) == raw
    (trace,) = traces_for(r4u, tag)
    assert trace["response"] == raw.decode("utf-8", "replace")
    assert trace["metadata"]["events"] == len(FRAMING[name])
    assert trace["metadata"]["response_bytes"] == len(raw)


@pytest.mark.parametrize("ending", ["complete", "cut by the upstream"])
def test_store_streamed_bodies_keeps_the_bytes_the_client_got(tmp_path, upstream, r4u, ending):
    """mitmproxy's own `store_streamed_bodies`, with plain mitmdump: every addon after the tracer
    (here tests/fakes/kept.py), flow_detail and save files see the streamed body in the flow,
    byte for byte what the client got: kept by mitmproxy when the response ends well, put back
    from the tracer's tee when it does not (an `error` ending, where mitmproxy keeps nothing)."""
    import httpx

    x_fake = "synth=30;chunk=random:3" + (";cut_after=12" if ending != "complete" else "")
    test_id = uuid.uuid4().hex
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port,
                  options={"store_streamed_bodies": "true"}, args=("-s", str(KEPT))) as proxy:
        got = []
        with httpx.Client(proxy=proxy.url, verify=str(proxy.ca_file)) as client:
            try:
                with client.stream("POST", "https://api.openai.com/v1/chat/completions",
                                   json={"model": "gpt-4o-mini", "messages": CHAT, "stream": True},
                                   headers={"x-fake": x_fake, "x-test-id": test_id}) as answer:
                    for piece in answer.iter_raw():
                        got.append(piece)
            except httpx.RemoteProtocolError:
                assert ending != "complete"
        kept = wait_for(lambda: re.search(rf"kept (no )?body of {test_id}(: (\d+) bytes sha256 (\w+))?", proxy.log()),
                        what="the kept-body line")
    body = b"".join(got)
    assert body.startswith(b"data: ") and (body.endswith(b"data: [DONE]\n\n") == (ending == "complete"))
    assert kept.group(1) is None, "the flow kept no body"
    assert (int(kept.group(3)), kept.group(4)) == (len(body), hashlib.sha256(body).hexdigest())
