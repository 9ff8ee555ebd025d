"""Opt-in: the openai SDK → mitmdump with the addon → fake upstream, into the REAL R4U backend, and
what that backend stored. `R4U_BACKEND=<open-r4u tree> scripts/test -k real_r4u`; skipped without
it (see tests/real_r4u.py for how the backend runs)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import openai
import pytest

from r4u_mitm.spool import read_dead_letters
from tests.conftest import SECRET, assert_no_secret, headers
from tests.harness import Mitmdump, wait_for
from tests.real_r4u import ENV, RealR4U

pytestmark = pytest.mark.skipif(not os.environ.get(ENV), reason=f"{ENV}=<open-r4u tree> runs these")

CHAT = [{"role": "user", "content": "Say hello in French"}]
AZURE = "https://contoso.openai.azure.com"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def real_r4u(tmp_path_factory):
    backend = RealR4U(Path(os.environ[ENV]), tmp_path_factory.mktemp("open-r4u"))
    try:
        yield backend.start()
    finally:
        backend.stop()


@pytest.fixture(scope="module")
def real_proxy(tmp_path_factory, upstream, real_r4u):
    with Mitmdump(tmp_path_factory.mktemp("proxy"), r4u_url=real_r4u.url, upstream_port=upstream.port) as proxy:
        yield proxy


@pytest.fixture
def app(real_proxy, monkeypatch):
    for key, value in real_proxy.client_env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def client(app):
    return openai.OpenAI(api_key=SECRET, max_retries=0)


@pytest.fixture
def azure(app):
    return openai.AzureOpenAI(azure_endpoint=AZURE, api_key=SECRET, api_version="2024-10-21", max_retries=0)


def stored(backend: RealR4U, tag: str) -> tuple[dict, dict]:
    """The structured trace R4U made of the exchange tagged `tag`, and its raw row; R4U got
    that record once."""

    def trace():
        return next((t for t in backend.traces()
                     if (t.get("trace_metadata") or {}).get("properties", {}).get("test") == tag), None)

    found = wait_for(trace, 30, f"R4U's structured trace tagged {tag}")
    rows = [r for r in backend.raw_rows() if r["metadata"]["trace_id"] == found["trace_metadata"]["trace_id"]]
    assert len(rows) == 1, "R4U got the record more than once"
    raw = backend.get(f"/v1/traces/{found['id']}/http-trace")
    assert raw["id"] == rows[0]["id"]
    assert_no_secret(found, raw)
    return found, raw


def messages(trace: dict) -> list[str]:
    return [c["text"] for item in trace["output"] if item["type"] == "message" for c in item["data"]["content"]]


def calls(trace: dict) -> list[tuple[str, dict]]:
    return [(item["data"]["name"], json.loads(item["data"]["arguments"]))
            for item in trace["output"] if item["type"] == "function_call"]


def check_input(trace: dict) -> None:
    assert [(i["data"]["role"], i["data"]["content"]) for i in trace["input"]] == [("user", CHAT[0]["content"])]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_chat(client, real_r4u, tag, stream):
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=stream,
                                            stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
                                            extra_headers=headers(tag))
    if stream:
        chunks = list(answer)
        text, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
    else:
        text, usage = answer.choices[0].message.content, answer.usage
    trace, raw = stored(real_r4u, tag)
    assert text and messages(trace) == [text]
    # R4U names a model it knows by provider/model
    assert trace["model"] == "openai/gpt-4o-mini" and trace["error"] is None and trace["finish_reason"] == "stop"
    assert trace["total_tokens"] == usage.total_tokens
    check_input(trace)
    assert raw["metadata"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert "upstream_url" not in raw["metadata"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_azure_chat(azure, real_r4u, tag, stream):
    answer = azure.chat.completions.create(model="gpt-4o-deployment", messages=CHAT, stream=stream,
                                           extra_headers=headers(tag))
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    else:
        text = answer.choices[0].message.content
    trace, raw = stored(real_r4u, tag)
    assert text and messages(trace) == [text]
    # the request's model first: the deployment, which the SDK also puts in the body
    assert trace["model"] == "gpt-4o-deployment" and trace["error"] is None and trace["finish_reason"] == "stop"
    check_input(trace)
    meta = raw["metadata"]
    assert meta["url"] == "https://api.openai.com/v1/chat/completions"
    deployment_url = f"{AZURE}/openai/deployments/gpt-4o-deployment/chat/completions?api-version=2024-10-21"
    assert meta["upstream_url"] == deployment_url
    assert meta["azure_deployment"] == "gpt-4o-deployment" and meta["api_version"] == "2024-10-21"
    assert meta["upstream_request_id"] == raw["response_headers"]["x-request-id"]
    assert raw["request_headers"]["api-key"] == "[REDACTED]"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls(client, real_r4u, tag, stream):
    answer = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, tools=TOOLS, stream=stream,
                                            extra_headers=headers(tag))
    if stream:
        parts: dict[int, list[str]] = {}
        names: dict[int, str] = {}
        for chunk in answer:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                names[tc.index] = names.get(tc.index) or tc.function.name
                parts.setdefault(tc.index, []).append(tc.function.arguments or "")
        seen = [(names[i], json.loads("".join(parts[i]))) for i in sorted(parts)]
    else:
        seen = [(tc.function.name, json.loads(tc.function.arguments)) for tc in answer.choices[0].message.tool_calls]
    trace, _ = stored(real_r4u, tag)
    assert len(seen) > 1 and calls(trace) == seen
    assert trace["finish_reason"] == "tool_calls"


def test_embeddings_single_input(client, real_r4u, tag):
    client.embeddings.create(model="text-embedding-3-small", input="a lighthouse", extra_headers=headers(tag))
    trace, raw = stored(real_r4u, tag)
    assert trace["model"] == "text-embedding-3-small" and trace["output"] == []
    assert [(i["data"]["role"], i["data"]["content"]) for i in trace["input"]] == [("user", "a lighthouse")]
    assert raw["metadata"]["url"] == "https://api.openai.com/v1/embeddings"


ACCESS = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')  # uvicorn's access log lines


def requests_since(backend: RealR4U, offset: int) -> list[tuple[str, str, int]]:
    """(method, path, status) of each request R4U answered since its log had `offset` bytes."""
    with open(backend.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [(m[1], m[2], int(m[3])) for m in ACCESS.finditer(text)]


def test_embeddings_list_input_is_posted_max_attempts_times_then_dead_lettered(tmp_path, upstream, real_r4u,
                                                                                monkeypatch, tag):
    """R4U's parser crashes on embeddings with a list input (500, every time), after storing a raw
    row: the record is posted r4u_max_attempts times, no more, then dead-lettered with R4U's
    detail. Meanwhile R4U sees nothing but posts of traces and the deliverers' GET /health."""
    since = real_r4u.log_path.stat().st_size
    with Mitmdump(tmp_path, r4u_url=real_r4u.url, upstream_port=upstream.port,
                  options={"r4u_max_attempts": 2}) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        answer = openai.OpenAI(api_key=SECRET, max_retries=0).embeddings.create(
            model="text-embedding-3-small", input=["a lighthouse", "a harbour"], extra_headers=headers(tag))
        assert len(answer.data) == 2  # the app got its answer, whatever R4U makes of the trace
        (dead,) = wait_for(lambda: read_dead_letters(proxy.outbox), 90, "the trace dead-lettered")
    assert dead["status"] == 500 and dead["attempts"] == 2
    assert dead["reason"] == "HTTP 500: Internal error parsing HTTP trace: 'str' object has no attribute 'get'"
    rows = [r for r in real_r4u.raw_rows() if r["metadata"]["trace_id"] == dead["trace_id"]]
    assert len(rows) == 2 and rows[0]["metadata"]["properties"]["test"] == tag  # a raw row per post
    assert_no_secret(rows)
    seen = requests_since(real_r4u, since)
    assert seen.count(("POST", "/v1/http-traces", 500)) == 2
    assert {(method, path) for method, path, _ in seen} <= {("POST", "/v1/http-traces"), ("GET", "/health")}, seen
