#!/usr/bin/env python3
"""Stress: many concurrent event streams through one mitmdump with the addon; print figures.

    .venv/bin/python scripts/stress_streams.py [--streams 1000] [--events 20] [--delay-ms 10]
                                               [--http2] [--chunk event]

Starts the fake OpenAI upstream (TLS), the fake R4U and a real mitmdump with the addon, opens
`--streams` streams at once through it (asyncio + httpx, one connection each, or one HTTP/2
connection with --http2), and reports: whether every client got its whole stream byte for byte,
wall time, per-stream time to first byte and duration (p50/p95/max), mitmdump's CPU time and
peak memory, how long until R4U held every trace, whether every trace is complete, and the
addon's internal errors. Figures are what this machine did once, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from r4u_mitm.spool import read_stats  # noqa: E402
from tests.fakes.r4u import FakeR4U  # noqa: E402
from tests.fakes.upstream import FakeUpstream  # noqa: E402
from tests.harness import Mitmdump  # noqa: E402

CREATED = re.compile(rb'"created":\d+')


class H2First(ssl.SSLContext):
    """httpx offers ALPN http/1.1 first through a proxy tunnel and mitmproxy honours the order."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds used, peak RSS in MB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 1024
    return cpu, peak


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def one(client: httpx.AsyncClient, tag: str, x_fake: str) -> tuple[bytes, float, float]:
    start = time.monotonic()
    async with client.stream("POST", "https://api.openai.com/v1/chat/completions",
                             json={"model": "gpt-4o-mini", "stream": True, "messages": []},
                             headers={"X-R4U-Test": tag, "x-fake": x_fake, "authorization": "Bearer sk-stress"}) as r:
        ttfb = time.monotonic() - start
        body = b"".join([piece async for piece in r.aiter_raw()])
    return body, ttfb, time.monotonic() - start


async def run_streams(proxy: Mitmdump, n: int, tag: str, x_fake: str, http2: bool):
    context = H2First(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(proxy.ca_file))
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(proxy=proxy.url, verify=context, http2=http2, limits=limits, timeout=300) as client:
        return await asyncio.gather(*(one(client, tag, x_fake) for _ in range(n)), return_exceptions=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--events", type=int, default=20, help="content events per stream (synth=N)")
    ap.add_argument("--delay-ms", type=int, default=10, help="upstream delay before each write")
    ap.add_argument("--chunk", default="event", help="how the upstream cuts the body (x-fake chunk=)")
    ap.add_argument("--http2", action="store_true", help="clients speak HTTP/2 to mitmproxy")
    ap.add_argument("--workdir", help="keep mitmdump's log and outbox here (default: a temp dir, removed)")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for R4U to hold every trace")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * a.streams + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by mitmdump

    x_fake = f"synth={a.events};delay_ms={a.delay_ms};chunk={a.chunk}"
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="r4u-stress-") as tmp:
        if a.workdir:
            tmp = a.workdir
        upstream = FakeUpstream(tls=True)
        upstream.start()
        r4u = FakeR4U()
        r4u.start()
        try:
            with Mitmdump(Path(tmp), r4u_url=r4u.url, upstream_port=upstream.port) as proxy:
                cpu0, _ = proc_figures(proxy.proc.pid)
                t0 = time.monotonic()
                results = asyncio.run(run_streams(proxy, a.streams, tag, x_fake, a.http2))
                wall = time.monotonic() - t0
                cpu1, peak = proc_figures(proxy.proc.pid)
                failed = [r for r in results if isinstance(r, BaseException)]
                ok = [r for r in results if not isinstance(r, BaseException)]
                bodies = {CREATED.sub(b'"created":0', body) for body, _, _ in ok}
                deadline = time.monotonic() + a.wait
                while True:
                    mine = [t for t in list(r4u.received) if t["metadata"].get("properties", {}).get("test") == tag]
                    if len({t["metadata"]["trace_id"] for t in mine}) >= len(ok) or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                traced_after = time.monotonic() - t0
                cpu2, peak = proc_figures(proxy.proc.pid)
                log = proxy.log()
            stats = read_stats(proxy.outbox)
        finally:
            upstream.stop()
            r4u.stop()

    ids = {t["metadata"]["trace_id"] for t in mine}
    complete = sum(1 for t in mine if t["metadata"]["stream_complete"] is True and t["error"] is None)
    events = {t["metadata"]["events"] for t in mine}
    ttfb = [r[1] * 1000 for r in ok]
    dur = [r[2] * 1000 for r in ok]
    body_len = len(next(iter(bodies))) if bodies else 0
    print(f"streams           {a.streams} at once ({'HTTP/2, one connection' if a.http2 else 'HTTP/1.1, one connection each'}), "
          f"x-fake {x_fake}")
    print(f"client            {len(ok)} ok, {len(failed)} failed"
          + (f" (first: {failed[0]!r})" if failed else "")
          + f"; {len(bodies)} distinct bodies (1 = all identical), {body_len} bytes each")
    print(f"wall              {wall:.2f} s for all streams; "
          f"{len(ok) * body_len / wall / 1e6:.2f} MB/s, {len(ok) * (a.events + 3) / wall:.0f} events/s through the proxy")
    if ok:
        print(f"per stream        ttfb p50 {statistics.median(ttfb):.0f} ms, p95 {pct(ttfb, 95):.0f} ms, max {max(ttfb):.0f} ms; "
              f"duration p50 {statistics.median(dur):.0f} ms, p95 {pct(dur, 95):.0f} ms, max {max(dur):.0f} ms "
              f"(the upstream alone takes ~{(a.events + 3) * a.delay_ms} ms)")
    print(f"mitmdump          CPU {cpu1 - cpu0:.2f} s during the streams, {cpu2 - cpu0:.2f} s until all traced; "
          f"peak RSS {peak:.0f} MB")
    print(f"R4U               {len(ids)} traces for {len(ok)} streams, {traced_after:.2f} s after the start; "
          f"{complete} complete with no error; events per trace {sorted(events)}")
    print(f"outbox at exit    pending {stats['pending']}, delivered {stats['delivered']}, "
          f"retried {stats['retried']}, dropped {stats['dropped']}")
    print(f"addon errors      {log.count('internal error')} internal error line(s), "
          f"{log.count('error building a trace record')} record error line(s)")
    good = not failed and len(bodies) == 1 and len(ids) == len(ok) == complete
    print("RESULT            " + ("all streams whole, all traced" if good else "PROBLEMS (see above)"))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
