"""Any deployment: reverse mode, Azure, Anthropic, and a local OpenAI-compatible server over
plain HTTP, each through a real mitmdump with the addon."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import SECRET, assert_no_secret, headers, stream_bytes, traces_for
from tests.harness import Mitmdump

CHAT = [{"role": "user", "content": "hi"}]


def test_reverse_mode_needs_no_ca_and_keeps_the_upstream_url(tmp_path, upstream, r4u, tag):
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port,
                  args=("--mode", "reverse:https://api.openai.com")) as proxy:
        client = openai.OpenAI(api_key=SECRET, base_url=f"{proxy.url}/v1", max_retries=0)
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag)) if c.choices)
    (trace,) = traces_for(r4u, tag)
    assert text
    assert trace["metadata"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert trace["metadata"]["stream_complete"] is True and trace["error"] is None


@pytest.fixture
def multi_provider_proxy(tmp_path, upstream, r4u, local_upstream, monkeypatch):
    hosts = ["api.openai.com", "*.openai.azure.com=azure_openai", "api.anthropic.com=anthropic",
             f"localhost:{local_upstream.port}=openai_compatible"]
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port,
                  args=tuple(a for h in hosts for a in ("--set", f"r4u_hosts={h}"))) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        yield proxy


@pytest.fixture
def local_upstream():
    from tests.fakes.upstream import FakeUpstream

    fake = FakeUpstream(tls=False)
    fake.start()
    yield fake
    fake.stop()


def test_azure_openai(multi_provider_proxy, r4u, tag):
    client = openai.AzureOpenAI(azure_endpoint="https://my-resource.openai.azure.com", api_key=SECRET,
                                api_version="2024-10-21", max_retries=0)
    stream = client.chat.completions.create(model="my-deployment", messages=CHAT, stream=True,
                                            extra_headers=headers(tag))
    list(stream)
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert meta["provider"] == "azure_openai"
    # R4U reads OpenAI's format only at OpenAI's URL: the record names the operation by it, the truth beside.
    assert meta["url"] == "https://api.openai.com/v1/chat/completions"
    assert meta["upstream_url"] == ("https://my-resource.openai.azure.com/openai/deployments/my-deployment/"
                                    "chat/completions?api-version=2024-10-21")
    assert meta["azure_deployment"] == "my-deployment" and meta["api_version"] == "2024-10-21"
    assert meta["upstream_request_id"] == trace["response_headers"]["x-request-id"]
    assert trace["request_headers"]["api-key"] == "[REDACTED]"
    assert trace["response"] == stream_bytes("azure_chat/content_filter_results.sse").decode()
    assert meta["stream_complete"] is True and meta["model"]
    assert_no_secret(trace)


@pytest.mark.parametrize("name", ["anthropic/text.sse", "anthropic/tool_use.sse", "anthropic/thinking.sse",
                                  "anthropic/error_overloaded.sse"])
def test_anthropic_messages_stream(multi_provider_proxy, r4u, tag, name):
    proxy = multi_provider_proxy
    with httpx.Client(proxy=proxy.url, verify=str(proxy.ca_file)) as client:
        body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": CHAT}
        with client.stream("POST", "https://api.anthropic.com/v1/messages", json=body,
                           headers={"x-api-key": SECRET, "anthropic-version": "2023-06-01",
                                    **headers(tag, stream=name)}) as response:
            received = response.read()
    assert received == stream_bytes(name)
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert meta["provider"] == "anthropic" and trace["request_headers"]["x-api-key"] == "[REDACTED]"
    assert meta["upstream_request_id"] == trace["response_headers"]["request-id"]
    assert meta["stream_complete"] is True and meta["model"].startswith("claude")
    if name.endswith("error_overloaded.sse"):
        assert "overloaded" in trace["error"].lower()
    else:
        assert trace["error"] is None and meta["finish_reason"] and meta["usage"]["output_tokens"] > 0
    assert_no_secret(trace)


def test_local_openai_compatible_server_over_plain_http(multi_provider_proxy, r4u, local_upstream, tag):
    client = openai.OpenAI(api_key=SECRET, base_url=f"http://localhost:{local_upstream.port}/v1", max_retries=0)
    completion = client.chat.completions.create(model="local-model", messages=CHAT, extra_headers=headers(tag))
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["provider"] == "openai_compatible"
    assert trace["metadata"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert trace["metadata"]["upstream_url"] == f"http://localhost:{local_upstream.port}/v1/chat/completions"
    assert json.loads(trace["response"])["id"] == completion.id
