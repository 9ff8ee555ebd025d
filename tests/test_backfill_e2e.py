"""`r4u-mitm backfill`: the exchanges of a `mitmdump -w` file reach R4U as traces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai

from r4u_mitm.proxy.flows import NOT_STORED
from tests.conftest import SECRET, assert_no_secret, headers, stream_bytes, traces_for
from tests.harness import Mitmdump

CLI = Path(sys.executable).parent / "r4u-mitm"
CHAT = [{"role": "user", "content": "hi"}]


def record_flows(tmp_path, upstream, monkeypatch, tag, options=None) -> Path:
    """Plain mitmdump (no addon) saving flows, with the app making two OpenAI calls."""
    flows = tmp_path / "flows.mitm"
    with Mitmdump(tmp_path / "dump", addon=False, upstream_port=upstream.port, options=options,
                  args=("-w", str(flows))) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        client = openai.OpenAI(api_key=SECRET, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, extra_headers=headers(tag))
        list(client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                            extra_headers=headers(tag, stream="openai_chat/basic.sse")))
    return flows


def backfill(flows: Path, r4u, outbox: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "backfill", str(flows), "--r4u-url", r4u.url, "--outbox", str(outbox), "--wait", "20"],
                          capture_output=True, text=True, timeout=60)


def test_backfill_delivers_saved_flows_once_per_exchange(tmp_path, upstream, r4u, monkeypatch, tag):
    flows = record_flows(tmp_path, upstream, monkeypatch, tag)
    run = backfill(flows, r4u, tmp_path / "outbox.sqlite")
    assert run.returncode == 0, run.stderr
    assert "2 traced" in run.stderr
    plain, streamed = sorted(traces_for(r4u, tag, 2), key=lambda t: t["metadata"]["stream"])
    assert plain["error"] is None and plain["metadata"]["url"] == "https://api.openai.com/v1/chat/completions"
    assert streamed["response"] == stream_bytes("openai_chat/basic.sse").decode()
    assert streamed["metadata"]["stream_complete"] is True and streamed["metadata"]["ttft_ms"] is None
    assert_no_secret(plain, streamed)
    # The same file again: the same trace ids, so R4U (or whoever reads it) can tell duplicates.
    assert backfill(flows, r4u, tmp_path / "outbox2.sqlite").returncode == 0
    assert len(traces_for(r4u, tag, 2)) == 2  # distinct trace ids: still the same two
    sent = [t for t in r4u.received if t["metadata"].get("properties", {}).get("test") == tag]
    assert len(sent) == 4


def test_flows_saved_without_streamed_bodies_say_so(tmp_path, upstream, r4u, monkeypatch, tag):
    flows = record_flows(tmp_path, upstream, monkeypatch, tag, options={"stream_large_bodies": "1"})
    assert backfill(flows, r4u, tmp_path / "outbox.sqlite").returncode == 0
    notes = sorted(t["error"] or "" for t in traces_for(r4u, tag, 2))
    assert notes == [NOT_STORED, NOT_STORED]


def test_backfill_refuses_a_missing_file(tmp_path, r4u):
    run = backfill(tmp_path / "nope.mitm", r4u, tmp_path / "outbox.sqlite")
    assert run.returncode == 2 and "no such flow file" in run.stderr


def test_a_flow_traced_live_keeps_its_trace_id_and_streamed_body(tmp_path, upstream, r4u, monkeypatch, tag):
    """mitmdump with the addon and -w: the saved flow holds the teed stream, and backfilling it
    gives R4U the same trace id as the live trace."""
    flows = tmp_path / "flows.mitm"
    with Mitmdump(tmp_path / "live", r4u_url=r4u.url, upstream_port=upstream.port, args=("-w", str(flows))) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        client = openai.OpenAI(api_key=SECRET, max_retries=0)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                            extra_headers=headers(tag, stream="openai_chat/basic.sse")))
        (live,) = traces_for(r4u, tag)
    assert backfill(flows, r4u, tmp_path / "outbox.sqlite").returncode == 0  # waits until R4U has it
    sent = [t for t in r4u.received if t["metadata"].get("properties", {}).get("test") == tag]
    assert len(sent) == 2 and sent[1]["metadata"]["trace_id"] == live["metadata"]["trace_id"]
    assert sent[1]["response"] == live["response"] == stream_bytes("openai_chat/basic.sse").decode()
    assert sent[1]["metadata"]["properties"] == {"test": tag}
    # the addon left its pieces' arrival times on the saved flow: the same time to first token
    assert live["metadata"]["ttft_ms"] is not None
    assert abs(sent[1]["metadata"]["ttft_ms"] - live["metadata"]["ttft_ms"]) < 1.0  # two clock readings apart


def test_backfill_takes_the_redaction_options_of_the_addon(tmp_path, upstream, r4u, monkeypatch, tag):
    """`--redact-headers` and `--redact-body-keys` do what r4u_redact_headers and
    r4u_redact_body_keys do live; the default redaction applies as well."""
    import json

    flows = tmp_path / "flows.mitm"
    with Mitmdump(tmp_path / "dump", addon=False, upstream_port=upstream.port, args=("-w", str(flows))) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        openai.OpenAI(api_key=SECRET, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, max_tokens=20, extra_body={"session_ticket": SECRET, "api_key": SECRET},
            extra_headers={**headers(tag), "X-Mine": SECRET})
    run = subprocess.run([CLI, "backfill", str(flows), "--r4u-url", r4u.url, "--outbox", str(tmp_path / "o.sqlite"),
                          "--wait", "20", "--redact-headers", "x-mine", "--redact-body-keys", "sessionTicket"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (trace,) = traces_for(r4u, tag)
    assert_no_secret(trace)
    assert trace["request_headers"]["x-mine"] == trace["request_headers"]["authorization"] == "[REDACTED]"
    request = json.loads(trace["request"])
    assert request["session_ticket"] == request["api_key"] == "[REDACTED]" and request["max_tokens"] == 20


def test_backfill_takes_the_openai_url_alias_option_of_the_addon(tmp_path, upstream, r4u, monkeypatch, tag):
    """`--no-openai-url-alias` does what r4u_openai_url_alias=false does live: an Azure trace
    keeps its real URL in metadata.url."""
    flows = tmp_path / "flows.mitm"
    with Mitmdump(tmp_path / "dump", addon=False, upstream_port=upstream.port, args=("-w", str(flows))) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        openai.AzureOpenAI(azure_endpoint="https://myres.openai.azure.com", api_key=SECRET, api_version="2024-10-21",
                           max_retries=0).chat.completions.create(model="dep", messages=CHAT, extra_headers=headers(tag))
    run = subprocess.run([CLI, "backfill", str(flows), "--r4u-url", r4u.url, "--outbox", str(tmp_path / "o.sqlite"),
                          "--wait", "20", "--no-openai-url-alias"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    assert meta["url"] == "https://myres.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
    assert meta["provider"] == "azure_openai" and "upstream_url" not in meta
