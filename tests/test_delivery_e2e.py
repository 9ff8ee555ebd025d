"""No trace lost: R4U down, failing, rejecting; mitmdump killed or stopped with traces pending.
Each case: every exchange the app made reaches R4U exactly once (by trace_id), or sits in
dead-letter with a reason."""

from __future__ import annotations

import collections
import signal
import time

import openai
import pytest

from r4u_mitm.spool import read_stats
from tests.conftest import SECRET, headers
from tests.harness import Mitmdump, free_port, wait_for

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def r4u_later():
    """A fake R4U on a fixed port, not started: R4U is down until the test starts it."""
    from tests.fakes.r4u import FakeR4U

    fake = FakeR4U(port=free_port())
    yield fake
    fake.stop()


def use_proxy(monkeypatch, proxy: Mitmdump) -> openai.OpenAI:
    for key, value in proxy.client_env().items():
        monkeypatch.setenv(key, value)
    return openai.OpenAI(api_key=SECRET, max_retries=0)


def make_exchanges(client: openai.OpenAI, tag: str, n: int) -> None:
    """n exchanges, half of them streamed; the app must not notice anything."""
    for i in range(n):
        if i % 2:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT, stream=True, extra_headers=headers(tag)) if c.choices)
            assert text
        else:
            assert client.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                                  extra_headers=headers(tag)).choices


def wait_pending(outbox, n: int) -> None:
    wait_for(lambda: read_stats(outbox)["pending"] >= n, what=f"{n} traces in the outbox")


def delivered_once(r4u, tag: str, n: int, outbox, timeout: float = 60, resent_ok: bool = False) -> list[dict]:
    """Wait for n distinct traces tagged `tag` and for the outbox file `outbox` to be empty (every
    record stored was settled: no post of one can come any more). Then each trace_id is there
    exactly once (or, with `resent_ok`, re-sends of the identical record: posts cut by a killed
    deliverer are sent again)."""

    def mine() -> list[dict]:
        return [t for t in list(r4u.received) if t["metadata"].get("properties", {}).get("test") == tag]

    deadline = time.monotonic() + timeout
    while len({t["metadata"]["trace_id"] for t in mine()}) < n or read_stats(outbox)["pending"]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    pending = read_stats(outbox)["pending"]
    traces = mine()
    counts = collections.Counter(t["metadata"]["trace_id"] for t in traces)
    assert len(counts) == n and pending == 0, f"R4U got {len(counts)} of {n} traces; {pending} still in the outbox"
    if resent_ok:
        first = {t["metadata"]["trace_id"]: t for t in reversed(traces)}
        assert all(t == first[t["metadata"]["trace_id"]] for t in traces), "a re-send differs"
    else:
        assert set(counts.values()) == {1}, f"duplicates: {counts}"
    return traces


def test_r4u_down_at_start_then_up(tmp_path, upstream, r4u_later, monkeypatch, tag):
    with Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port) as proxy:
        client = use_proxy(monkeypatch, proxy)
        make_exchanges(client, tag, 4)
        wait_pending(proxy.outbox, 4)
        wait_for(lambda: "R4U is not answering" in proxy.log(), what="the warning that R4U is down")
        r4u_later.start()
        delivered_once(r4u_later, tag, 4, proxy.outbox)


def test_r4u_failing_then_rejecting_one(tmp_path, upstream, r4u_later, monkeypatch, tag):
    r4u_later.start()
    r4u_later.fail_next(3, 503)
    r4u_later.reject(lambda record: record["request_path"] == "/v1/models")
    with Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port) as proxy:
        client = use_proxy(monkeypatch, proxy)
        make_exchanges(client, tag, 4)
        client.models.list(extra_headers=headers(tag))  # the poison record
        delivered_once(r4u_later, tag, 4, proxy.outbox)
        wait_for(lambda: read_stats(proxy.outbox)["dead_lettered"], what="the poison record dead-lettered")
        stats = read_stats(proxy.outbox)
        assert stats["dead_lettered"] == 1 and stats["pending"] == 0 and stats["retried"] >= 3


def test_kill_9_with_traces_pending_then_restart(tmp_path, upstream, r4u_later, monkeypatch, tag):
    proxy = Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port).start()
    try:
        make_exchanges(use_proxy(monkeypatch, proxy), tag, 4)
        wait_pending(proxy.outbox, 4)
    finally:
        proxy.kill()
    r4u_later.start()
    with Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port) as again:
        delivered_once(r4u_later, tag, 4, again.outbox)


def test_sigterm_with_r4u_down_keeps_traces_for_the_next_run(tmp_path, upstream, r4u_later, monkeypatch, tag):
    proxy = Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port).start()
    make_exchanges(use_proxy(monkeypatch, proxy), tag, 3)
    assert proxy.stop(signal.SIGTERM) == 0  # a clean exit
    assert read_stats(proxy.outbox)["pending"] == 3
    assert "stay in" in proxy.log()
    r4u_later.start()
    with Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port) as again:
        delivered_once(r4u_later, tag, 3, again.outbox)


def test_sigint_drains_pending_traces_before_exit(tmp_path, upstream, r4u_later, monkeypatch, tag):
    r4u_later.start()
    proxy = Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port,
                     options={"r4u_drain_seconds": 10}).start()
    wait_for(lambda: proxy.deliverer_pid() and r4u_later.requests, what="the deliverer's start-up probe answered")
    r4u_later.hang(3.0)  # R4U slow: posts are still in flight when the proxy is asked to stop
    before = r4u_later.requests
    make_exchanges(use_proxy(monkeypatch, proxy), tag, 3)
    wait_for(lambda: r4u_later.requests > before, what="a post held by R4U")
    assert proxy.stop(signal.SIGINT) == 0  # mitmdump exits at once; its deliverer goes on
    delivered_once(r4u_later, tag, 3, proxy.outbox, timeout=15)  # posts in flight at the stop finish: none twice


def test_status_command_line(tmp_path, upstream, r4u_later, monkeypatch, tag):
    """`r4u-mitm status` reads the outbox without a running proxy."""
    import subprocess
    import sys
    from pathlib import Path

    proxy = Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port).start()
    make_exchanges(use_proxy(monkeypatch, proxy), tag, 2)
    proxy.stop()
    cli = Path(sys.executable).parent / "r4u-mitm"
    out = subprocess.run([cli, "status", "--outbox", str(proxy.outbox)], capture_output=True, text=True, check=True)
    assert "pending: 2" in out.stdout.replace("  ", "").replace(" :", ":")
    missing = subprocess.run([cli, "status", "--outbox", str(tmp_path / "nope.sqlite")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no outbox" in missing.stderr
