"""The delivery process under a real mitmdump: killed, unable to start, shared by two proxies,
a full disk under the spool, a script reload with a stream in flight. Each case: flows go on
unchanged and every exchange reaches R4U once (or waits in the spool, said in one clear line)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid

import httpx
import pytest

from r4u_mitm.delivery.deliver import NICENESS
from r4u_mitm.spool import read_stats
from tests.conftest import headers
from tests.harness import ADDON, Mitmdump, wait_for
from tests.test_delivery_e2e import delivered_once, make_exchanges, r4u_later, use_proxy  # noqa: F401 - a fixture
from tests.test_transparency_e2e import FAULTS, control

CHAT_URL = "https://api.openai.com/v1/chat/completions"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_deliverer_killed_mid_post_is_restarted_and_nothing_is_lost(tmp_path, upstream, r4u_later, monkeypatch,
                                                                       tag):
    r4u_later.start()
    r4u_later.hang(None)  # posts in flight when the deliverer dies
    with Mitmdump(tmp_path, r4u_url=r4u_later.url, upstream_port=upstream.port) as proxy:
        make_exchanges(use_proxy(monkeypatch, proxy), tag, 4)
        wait_for(lambda: r4u_later.requests >= 2, what="posts held by R4U")
        first = wait_for(proxy.deliverer_pid, what="the deliverer's pid")
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "the deliverer exited (code -9" in proxy.log(), what="the restart line")
        r4u_later.clear_faults()
        delivered_once(r4u_later, tag, 4, proxy.outbox, resent_ok=True)  # posts cut by the kill were sent again
        second = wait_for(proxy.deliverer_pid, what="the new deliverer's pid")
        assert second != first and alive(second)
        assert proxy.log().count("the deliverer exited") == 1
        wait_for(lambda: read_stats(proxy.outbox)["pending"] == 0)


def test_a_deliverer_that_cannot_start_says_so_once_and_traces_wait(tmp_path, upstream, r4u, monkeypatch, tag):
    proxy = Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port)
    blocker = tmp_path / "outbox.sqlite.lock"
    blocker.mkdir()  # the deliverer cannot take its lock: it exits at once, every time
    with proxy:
        make_exchanges(use_proxy(monkeypatch, proxy), tag, 2)
        line = wait_for(lambda: re.search(r".*the deliverer exited.*", proxy.log()), what="the line").group(0)
        assert "IsADirectoryError" in line and str(proxy.outbox) in line and "restarting in 1s" in line
        wait_for(lambda: read_stats(proxy.outbox)["pending"] == 2, what="the traces in the spool")
        seen: set[int] = set()

        def restarted_twice() -> bool:
            seen.update(_children(proxy.proc.pid))  # each start is a new process
            return len(seen) >= 3

        wait_for(restarted_twice, timeout=30, what="two restarts")
        assert proxy.log().count("the deliverer exited") == 1  # said once, not per restart
        assert read_stats(proxy.outbox)["pending"] == 2
        blocker.rmdir()  # fixed: the next restart (at most 4 s later) delivers
        delivered_once(r4u, tag, 2, proxy.outbox, timeout=30)


def test_two_proxies_on_one_spool_share_one_deliverer_and_post_each_trace_once(tmp_path, upstream, r4u,
                                                                                 monkeypatch, tag):
    shared = tmp_path / "shared.sqlite"
    with Mitmdump(tmp_path / "a", r4u_url=r4u.url, upstream_port=upstream.port,
                  options={"r4u_outbox": shared}) as a, \
            Mitmdump(tmp_path / "b", r4u_url=r4u.url, upstream_port=upstream.port,
                     options={"r4u_outbox": shared}) as b:
        make_exchanges(use_proxy(monkeypatch, a), tag, 4)
        make_exchanges(use_proxy(monkeypatch, b), tag, 4)
        delivered_once(r4u, tag, 8, shared)
        pid = read_stats(shared)["deliverer"]["pid"]
        owners = [p for p in (a, b) if pid in _children(p.proc.pid)]
        assert len(owners) == 1  # one of the two proxies' deliverers works; the other stands by
        assert all(len(_children(p.proc.pid)) == 1 for p in (a, b))
        a.stop()  # its deliverer drains and exits; the other one takes over
        make_exchanges(use_proxy(monkeypatch, b), tag + "-after", 2)
        delivered_once(r4u, tag + "-after", 2, shared, timeout=30)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: a real full disk (ENOSPC), not a simulated one. Needs mount rights."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                                          capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root with mount rights)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_under_the_spool_is_said_clearly_and_flows_go_on(tmp_path, upstream, r4u, small_disk, tag):
    prompt = "x" * 400_000
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port, args=("-s", str(FAULTS)),
                  options={"r4u_outbox": small_disk / "outbox.sqlite"}) as proxy:
        r4u.hang(None)  # nothing leaves the spool: it fills up
        try:
            for _ in range(12):  # ~5 MB of prompts into 3 MB
                # a connection each: the sixth large request on one kept-alive connection hangs
                # through plain mitmdump too (with the fake upstream), tracer or not
                with httpx.Client(proxy=proxy.url, verify=str(proxy.ca_file), timeout=30) as client:
                    r = client.post(CHAT_URL, json={"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                                           "content": prompt}]},
                                    headers={**headers(tag), "x-test-id": uuid.uuid4().hex})
                    assert r.status_code == 200 and r.json()["object"] == "chat.completion"  # unchanged
            line = wait_for(lambda: re.search(r".*cannot store traces in.*", proxy.log()), what="the line").group(0)
            assert "the disk (or this file's size limit) is full" in line and str(small_disk) in line
            status = dict(item.split("=", 1) for item in control(proxy, "/status").split(", "))
            assert int(status["store_errors"]) >= 1 and int(status["traced"]) == 12
        finally:
            r4u.clear_faults()
        assert proxy.log().count("cannot store traces in") == 1  # once per kind of failure


def test_a_script_reload_keeps_delivering_and_a_stream_across_it_is_complete(tmp_path, upstream, r4u, monkeypatch,
                                                                               tag):
    addon = tmp_path / "addon.py"
    shutil.copy(ADDON, addon)
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port, addon_file=addon) as proxy:
        deliverer = wait_for(proxy.deliverer_pid, what="the deliverer")
        with httpx.Client(proxy=proxy.url, verify=str(proxy.ca_file), timeout=30) as client, client.stream(
                "POST", CHAT_URL, json={"model": "gpt-4o-mini", "stream": True},
                headers={**headers(tag, synth=8, delay_ms=250)}) as r:
            pieces = r.iter_raw()
            got = [next(pieces)]
            future = time.time() + 5
            os.utime(addon, (future, future))  # mitmproxy reloads a script whose file changed
            wait_for(lambda: proxy.log().count("r4u-mitm loaded") == 2, what="the reload")
            got += list(pieces)
        (trace,) = delivered_once(r4u, tag, 1, proxy.outbox)
        assert trace["response"] == b"".join(got).decode()
        assert trace["metadata"]["stream_complete"] is True and trace["error"] is None
        make_exchanges(use_proxy(monkeypatch, proxy), tag + "-after", 2)  # delivery goes on
        delivered_once(r4u, tag + "-after", 2, proxy.outbox)
        assert proxy.deliverer_pid() == deliverer  # the same process: not stopped by the reload


def test_the_deliverer_runs_at_a_lower_cpu_priority_than_the_proxy(tmp_path, upstream, r4u, monkeypatch, tag):
    """Records can wait in the spool; the proxy's flows cannot: on a busy machine the scheduler
    must prefer mitmdump (and the apps) to the delivery process."""
    with Mitmdump(tmp_path, r4u_url=r4u.url, upstream_port=upstream.port) as proxy:
        make_exchanges(use_proxy(monkeypatch, proxy), tag, 1)
        delivered_once(r4u, tag, 1, proxy.outbox)
        deliverer = wait_for(proxy.deliverer_pid, what="the deliverer's pid")
        proxy_nice = os.getpriority(os.PRIO_PROCESS, proxy.proc.pid)
        assert os.getpriority(os.PRIO_PROCESS, deliverer) == min(19, proxy_nice + NICENESS)
        # on Linux it runs only where no proxy thread wants the CPU, all its threads
        assert os.sched_getscheduler(proxy.proc.pid) == os.SCHED_OTHER
        threads = os.listdir(f"/proc/{deliverer}/task")
        assert len(threads) > 1 and {os.sched_getscheduler(int(t)) for t in threads} == {os.SCHED_IDLE}
