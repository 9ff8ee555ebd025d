#!/usr/bin/env python3
"""The r4u-mitm benchmark (`scripts/bench`): one run, every figure side by side.

A) Four setups against a local fake OpenAI (FakeUpstream, TLS) streaming as fast as it can:
   direct (client -> fake) | plain mitmdump streaming every body (stream_large_bodies=1) |
   mitmdump + addon + fake R4U | mitmdump + addon with R4U down (a port nobody listens on).
   * time to first event (TTFT) over many short streams, in blocks interleaved across setups,
     and the proxy's CPU per short exchange (deferred record work included);
   * medium streams round-robin over the setups: events/s and proxy CPU per event (utime+stime
     from /proc/PID/stat), the steadiest figures on a noisy machine;
   * one long stream: events/s and MB/s at the client, the proxy's CPU per event, then short
     streams right after it until its exchange is stored (the spool writer thread shares the GIL);
   * 1, 10, 50 and 100 concurrent streams: total events/s, the streams' TTFT p99, proxy CPU per event,
     and the TTFT of probe requests made meanwhile by a separate process to a second, idle fake;
   * peak RSS of each proxy (VmHWM, reset per phase through /proc/PID/clear_refs), alone and summed
     with its delivery process's;
   * every CPU figure twice: mitmdump alone, and mitmdump with every process it started (its
     deliverer), as issue 12 counts it; a final "Targets" section judges issue 12's rows.
B) Delivery through the proxy: end of stream (record's completed_at) -> R4U got it (p50, p99);
   the backlog left by the R4U-down proxy, and how fast a restarted proxy drains it.
C) Delivery alone: a spool pre-filled with exchanges of ~3 KB records, drained by the delivery process
   (`python -m r4u_mitm.delivery.deliver`) into `python -m tests.fakes.r4u`; then paced appends for end -> 201 latency.
D) The pure parts: SSEDecoder, build_record, Tap.__call__, the response hook's join.

Host: through the proxies the client asks for the fake's own address, https://127.0.0.1:PORT, and
the addon traces it (`r4u_hosts=127.0.0.1:PORT=openai`). Asking for api.openai.com and letting
tests/fakes/route.py reroute it would change `server.address` on connect, so mitmproxy never reuses
an upstream connection (a new TLS connection per request) and the 6th request on one client
connection hangs; a real upstream keeps its address, so this is the faithful setup.

Ratios are taken within the run (the machine may be noisy: the report says how much CPU other
processes used meanwhile); long phases are repeated in a rotated order and medians reported. The
fakes run as child processes so that their work does not take the measuring client's GIL. With 2+
CPUs each proxy is pinned to one CPU and the client and the fake OpenAI to another (`--no-pin`: let
the scheduler choose); a proxy's delivery process shares its proxy's CPU (it runs under SCHED_IDLE),
or the client's with `--deliverer-core client`. The fake R4U of parts A and B stands for a backend
on another machine: it runs under SCHED_IDLE on any CPU, so its parsing of records takes only time
that neither the proxy nor the client wants (pinned beside the client, it slowed the client's side
of "R4U up" only). Measurement only: nothing here asserts a time.
Traffic stays on 127.0.0.1; every loop is bounded; every child is killed on exit (also Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"
# The trace URL of the records built in C and D (A's clients ask for the fake's own address).
PROXIED_URL = "https://api.openai.com" + CHAT_PATH
REQUEST_BODY = json.dumps({
    "model": MODEL, "stream": True, "temperature": 0.2,
    "messages": [{"role": "system", "content": "You are a terse assistant."},
                 {"role": "user", "content": "Write a short paragraph about proxies, in French."}],
}, separators=(",", ":")).encode()
MB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    short: int               # short streams per setup for TTFT (sequential, one connection)
    short_blocks: int        # ... in this many blocks, interleaved across setups
    short_synth: int         # events of a short stream (synth=N -> N + 3 events)
    long_events: int         # the long stream
    after_long: float        # seconds of short streams right after the long one
    conc: tuple[int, ...]    # concurrent streams
    conc_synth: int          # events per concurrent stream
    reps: int                # repetitions of the long and concurrent phases (rotated order)
    rr_rounds: int           # round-robin streams per setup for CPU per chunk
    rr_events: int           # ... of this many events
    drain_timeout: float
    deliver_n: int           # C: records pre-filled
    latency: tuple[tuple[int, float], ...]   # C: (records/s, seconds) of paced submits
    sse_mb: int              # D
    build_events: int        # D
    tap_calls: int           # D


PROFILES = {
    "quick": Profile("quick", short=32, short_blocks=2, short_synth=20, long_events=10_000, after_long=0.3,
                     conc=(1, 10, 50, 100), conc_synth=60, reps=1, rr_rounds=2, rr_events=4_000, drain_timeout=30,
                     deliver_n=1_000, latency=((200, 0.5),), sse_mb=2, build_events=8_000, tap_calls=200_000),
    "default": Profile("default", short=200, short_blocks=4, short_synth=20, long_events=100_000, after_long=1.0,
                       conc=(1, 10, 50, 100), conc_synth=500, reps=2, rr_rounds=4, rr_events=10_000, drain_timeout=120,
                       deliver_n=20_000,
                       latency=((100, 3.0), (1000, 2.0)), sse_mb=20, build_events=100_000, tap_calls=1_000_000),
    "long": Profile("long", short=1_000, short_blocks=10, short_synth=20, long_events=200_000, after_long=2.0,
                    conc=(1, 10, 50, 100), conc_synth=3_000, reps=4, rr_rounds=20, rr_events=20_000, drain_timeout=300,
                    deliver_n=50_000,
                    latency=((100, 10.0), (1000, 5.0)), sse_mb=50, build_events=300_000, tap_calls=3_000_000),
}

SETUPS = ("direct", "plain", "addon", "down")
LABELS = {"direct": "direct", "plain": "plain mitmdump", "addon": "addon+R4U", "down": "addon, R4U down"}


# Statistics and formatting -------------------------------------------------------------------------

def pct(values, q: float) -> float:
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, str):
        return x
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def iso_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# Processes ------------------------------------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def proc_times(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of a process in seconds, from /proc/PID/stat: its own CPU
    (all threads) and that of the children it started and reaped."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK, (int(fields[13]) + int(fields[14])) / CLK


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    return proc_times(pid)[0]


def status_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid`, from /proc."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def descendants(pid: int, limit: int = 256) -> list[int]:
    """Every live process `pid` started, and those they started (a proxy's delivery process)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < limit:
        for child in child_pids(todo.pop()):
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def tree_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a proxy: (mitmdump alone, mitmdump and every process it started). The
    second adds each live descendant's utime+stime+cutime+cstime and mitmdump's cutime+cstime
    (children it reaped). Sampled at a phase's start and end, the difference counts a deliverer
    that lives on, dies or is restarted meanwhile for its CPU within the phase. mitmdump is read
    last: a descendant gone since the listing has been reaped into its parent's cutime."""
    others = 0.0
    for child in descendants(pid):
        try:
            own, reaped = proc_times(child)
        except (OSError, ValueError, IndexError):
            continue
        others += own + reaped
    own, reaped = proc_times(pid)
    return own, own + reaped + others


def tree_mb(pid: int, key: str) -> tuple[float, float]:
    """A /proc/PID/status figure (VmHWM, VmRSS) of mitmdump alone, and summed over it and the
    processes it started (its delivery process)."""
    alone = status_mb(pid, key)
    others = [status_mb(child, key) for child in descendants(pid)]
    return alone, alone + sum(x for x in others if not math.isnan(x))


def reset_tree_peak(pid: int) -> None:
    for p in (pid, *descendants(pid)):
        reset_peak(p)


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of `pid` (threads made later inherit it from their creator)."""
    if not cpus:
        return
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass
    except OSError:
        pass


class LoadSampler:
    """How busy the machine is with *other* processes (a shared VM is noisy): every 0.5 s, the
    CPU time of the whole machine (/proc/stat, steal included) minus that of this run's processes."""

    def __init__(self, pids) -> None:
        self.pids = pids                 # () -> the pids of this run (self and children)
        self.samples: list[tuple[float, float, float]] = []   # (t, foreign cores, steal cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)   # user nice system irq softirq steal
        return busy / CLK, (v[7] if len(v) > 7 else 0) / CLK

    def _ours(self) -> dict[int, float]:
        out = {}
        for pid in self.pids():
            try:
                out[pid] = cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                pass
        return out

    def _run(self) -> None:
        t0, (busy0, steal0), ours0 = time.monotonic(), self._machine(), self._ours()
        while not self._stop.wait(0.5):
            t1, (busy1, steal1), ours1 = time.monotonic(), self._machine(), self._ours()
            mine = sum(ours1[p] - ours0[p] for p in ours1 if p in ours0)
            dt = max(1e-6, t1 - t0)
            self.samples.append((t1, max(0.0, busy1 - busy0 - mine) / dt, (steal1 - steal0) / dt))
            t0, busy0, steal0, ours0 = t1, busy1, steal1, ours1

    def start(self) -> "LoadSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def summary(self, t_from: float = 0.0, t_to: float = math.inf) -> dict:
        xs = [s for s in self.samples if t_from <= s[0] <= t_to]
        if not xs:
            return {"mean": math.nan, "p90": math.nan, "steal": math.nan}
        return {"mean": statistics.fmean(s[1] for s in xs), "p90": pct([s[1] for s in xs], 90),
                "steal": statistics.fmean(s[2] for s in xs)}


class Children:
    """Every process this run starts, killed on exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.proxies: list = []

    def spawn(self, cmd: list[str], log: Path, ready: str, timeout: float = 30) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env=_no_proxy_env())
        out.close()
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[2:4]} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return proc

    def proxy(self, mitm) -> object:
        self.proxies.append(mitm)
        mitm.start()
        return mitm

    def stop_proxy(self, mitm, timeout: float = 30) -> None:
        try:
            mitm.stop(timeout=timeout)
        except Exception:  # noqa: BLE001 - killed below
            pass
        finally:
            mitm.kill()
            if getattr(mitm, "_log", None) is not None:
                mitm._log.close()
            if mitm in self.proxies:
                self.proxies.remove(mitm)

    def stop(self, proc: subprocess.Popen) -> None:
        self._end([proc])
        if proc in self.procs:
            self.procs.remove(proc)

    @staticmethod
    def _end(procs: list[subprocess.Popen]) -> None:
        """EOF for the probes, then SIGINT (the fakes clean up on it), SIGTERM, SIGKILL: each to
        every process group still there, with a short wait in between."""
        for proc in procs:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for sig, wait in ((None, 2.0), (signal.SIGINT, 3.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                return
            for proc in alive:
                if sig is not None:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.05)

    def pids(self) -> list[int]:
        out = [os.getpid()]
        out += [p.pid for p in list(self.procs) if p.poll() is None]
        for m in list(self.proxies):
            if m.proc is not None and m.proc.poll() is None:
                out += [m.proc.pid, *descendants(m.proc.pid)]  # with its delivery process
        return out

    def kill_all(self) -> None:
        for mitm in list(self.proxies):
            try:
                mitm.kill()
            finally:
                if getattr(mitm, "_log", None) is not None:
                    mitm._log.close()
        self.proxies.clear()
        self._end(list(self.procs))
        self.procs.clear()


def _no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


# The fake R4U with receive times (a child process: `bench.py _r4u --port P --log FILE`) ------------

def serve_r4u(port: int, log: str) -> int:
    """FakeR4U, plus one JSON line per accepted record: when it arrived (wall clock), the record's
    completed_at, its X-R4U-Setup / X-R4U-Phase tags and size. Keeps no records (memory)."""
    from tests.fakes.r4u import FakeR4U

    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # another machine's CPU: see the docstring
    out = open(log, "a", buffering=1)
    fake: FakeR4U

    def on_record(record: dict, n: int) -> None:
        now = time.time()
        meta = record.get("metadata") or {}
        props = meta.get("properties") or {}
        out.write(json.dumps({"t": now, "c": record.get("completed_at"), "s": props.get("setup"),
                              "p": props.get("phase"), "b": len(record.get("response") or ""),
                              "e": meta.get("events")}) + "\n")
        fake.received.clear()  # the fake's own loop thread appends: nothing races this

    fake = FakeR4U(port, on_record=on_record)
    fake.start()
    print(f"fake R4U ready on {fake.url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fake.stop()
    out.close()
    return 0


def serve_probe(proxy: str, ca: str, url: str, setup: str) -> int:
    """Probe requests in their own process (`bench.py _probe ...`), so that their timing does not
    wait for the measuring client's busy event loop: on "start PHASE" (stdin), short streams one
    after another with 20 ms pauses; on "stop", one JSON line with their TTFTs; EOF: exit."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cmds: asyncio.Queue[str] = asyncio.Queue()

        def read() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(cmds.put_nowait, line.strip())
            loop.call_soon_threadsafe(cmds.put_nowait, "quit")

        threading.Thread(target=read, daemon=True).start()
        s = Setup(setup, make_client(proxy or None, ca, 2), url)
        await stream_once(s, 1, "warm")
        print(json.dumps({"ready": True}), flush=True)
        while True:
            cmd = await cmds.get()
            if not cmd.startswith("start"):
                break
            phase = cmd.split()[1]
            sent0, ttfts = s.sent, []
            stop = asyncio.ensure_future(cmds.get())
            for _ in range(10_000):
                if stop.done():
                    break
                q = await stream_once(s, 1, phase)
                if q.ok and not stop.done():
                    ttfts.append(q.ttft_ms)
                await asyncio.wait({stop}, timeout=0.02)
            try:
                await asyncio.wait_for(stop, 600)
            except TimeoutError:
                break
            print(json.dumps({"ttft": ttfts, "sent": s.sent - sent0}), flush=True)
        await s.client.aclose()

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent's shell ignores it
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # stopped by the parent
        pass
    return 0


class Probe:
    """The parent's handle on a probe process."""

    def __init__(self, children: "Children", setup: str, proxy: str | None, ca: str, url: str,
                 cpus: set[int] | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_probe", "--setup", setup, "--url", url, "--ca", ca]
        if proxy:
            cmd += ["--proxy", proxy]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                                     start_new_session=True, env=_no_proxy_env())
        children.procs.append(self.proc)
        pin(self.proc.pid, cpus)
        if not self._read(60).get("ready"):
            raise RuntimeError(f"the probe process for {setup} did not start")

    def _read(self, timeout: float) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        return json.loads(line) if line.strip() else {}

    def start(self, phase: str) -> None:
        self.proc.stdin.write(f"start {phase}\n".encode())
        self.proc.stdin.flush()

    def stop(self) -> dict:
        self.proc.stdin.write(b"stop\n")
        self.proc.stdin.flush()
        return self._read(60) or {"ttft": [], "sent": 0}


class R4ULog:
    """The records the timing fake R4U saw, read incrementally from its log."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rows = path, 0, []

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return self.rows
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            self.rows.append(json.loads(line))
        self.pos += end
        return self.rows

    def select(self, setup: str | None = None, phase: str | None = None) -> list[dict]:
        self.poll()
        return [r for r in self.rows if (setup is None or r["s"] == setup) and (phase is None or r["p"] == phase)]

    async def wait(self, setup: str, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.select(setup)) >= count:
                return True
            await asyncio.sleep(0.02)
        return False


# The client -------------------------------------------------------------------------------------

@dataclass
class Stream:
    t0: float
    t_first: float | None
    t_end: float
    events: int
    nbytes: int
    ok: bool

    @property
    def ttft_ms(self) -> float:
        return math.nan if self.t_first is None else (self.t_first - self.t0) * 1000


@dataclass
class Setup:
    name: str
    client: object
    url: str
    proxy: object = None
    pid: int | None = None
    probe: "Probe | None" = None   # a process making short requests to an idle second fake
    sent: int = 0                  # traced requests sent (all of them, warm-ups included)
    errors: int = 0
    short_cpu: float = 0.0         # proxy CPU seconds per short stream (from the TTFT phase), mitmdump alone
    short_tcpu: float = 0.0        # ... mitmdump and every process it started
    short_cpus: list = field(default_factory=list)
    short_ocpus: list = field(default_factory=list)   # ... the processes it started alone
    peaks: dict = field(default_factory=dict)    # phase -> VmHWM MB, mitmdump alone
    tpeaks: dict = field(default_factory=dict)   # phase -> VmHWM MB, mitmdump + its delivery process
    base_rss: float = math.nan
    base_trss: float = math.nan
    max_body: int = 0              # the largest response body this setup carried (bytes)


async def stream_once(s: Setup, events: int, phase: str) -> Stream:
    """One streamed chat completion; counts events (b"\\n\\n", also when split across reads) as
    their bytes arrive and notes when the first one completed."""
    headers = {"authorization": "Bearer sk-bench-0000", "content-type": "application/json",
               "x-fake": f"synth={events};record=0", "x-r4u-setup": s.name, "x-r4u-phase": phase}
    s.sent += 1
    n = nbytes = 0
    first = None
    tail_nl = False
    t0 = time.perf_counter()
    try:
        async with s.client.stream("POST", s.url, content=REQUEST_BODY, headers=headers) as r:
            async for chunk in r.aiter_raw():
                if not chunk:
                    continue
                c = chunk.count(b"\n\n") + (1 if tail_nl and chunk[0] == 10 else 0)
                tail_nl = chunk[-1] == 10
                nbytes += len(chunk)
                if c:
                    if first is None:
                        first = time.perf_counter()
                    n += c
            ok = r.status_code == 200 and n == events + 3
    except Exception as exc:  # noqa: BLE001 - counted and shown; a benchmark goes on
        ok = False
        if s.errors < 3:
            print(f"  ! {s.name} {phase}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if not ok:
        s.errors += 1
    return Stream(t0, first, time.perf_counter(), n, nbytes, ok)


def make_client(proxy_url: str | None, cafile: str, conns: int):
    import httpx

    return httpx.AsyncClient(
        proxy=proxy_url, verify=ssl.create_default_context(cafile=cafile), trust_env=False,
        timeout=httpx.Timeout(120.0, connect=30.0),
        limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns, keepalive_expiry=3600),
    )


# Part A + B --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, prof: Profile, args, children: Children, tmp: Path) -> None:
        self.prof, self.args, self.children, self.tmp = prof, args, children, tmp
        ncpu = len(os.sched_getaffinity(0))
        self.pin_proxy = {1} if (ncpu >= 2 and not args.no_pin) else None
        self.pin_rest = {0} if (ncpu >= 2 and not args.no_pin) else None
        self.res: dict[str, dict] = {name: {"ttft": [], "short": [], "long": [], "after": [], "rr": [],
                                            "conc": {n: [] for n in prof.conc}} for name in SETUPS}
        self.b: dict = {}

    def log(self, text: str) -> None:
        if not self.args.quiet:
            print(f"[{time.monotonic() - self.t_start:6.1f}s] {text}", file=sys.stderr, flush=True)

    # Start and stop ------------------------------------------------------------------------------

    def start_fakes(self) -> None:
        from tests.harness import free_port

        py = sys.executable
        up_port = free_port()
        up_log = self.tmp / "upstream.log"
        self.upstream = self.children.spawn([py, "-m", "tests.fakes.upstream", "--port", str(up_port)], up_log,
                                            "cert ")
        self.up_port = up_port
        self.up_cert = next(line.split(" ", 1)[1] for line in up_log.read_text().splitlines()
                            if line.startswith("cert "))
        pin(self.upstream.pid, self.pin_rest)
        # a second, idle fake for probe requests while the first one is busy streaming: their time
        # to first event is the proxy's responsiveness under load, not the busy fake's backlog
        self.probe_port = free_port()
        probe_log = self.tmp / "probe-upstream.log"
        self.probe_upstream = self.children.spawn([py, "-m", "tests.fakes.upstream", "--port", str(self.probe_port)],
                                                  probe_log, "cert ")
        self.probe_cert = next(line.split(" ", 1)[1] for line in probe_log.read_text().splitlines()
                               if line.startswith("cert "))
        pin(self.probe_upstream.pid, self.pin_rest)
        self.r4u_port = free_port()
        self.r4u_log = R4ULog(self.tmp / "r4u-received.jsonl")
        self.r4u = self.children.spawn([py, str(Path(__file__).resolve()), "_r4u", "--port", str(self.r4u_port),
                                        "--log", str(self.r4u_log.path)], self.tmp / "r4u.log", "ready")
        self.down_port = free_port()  # nobody listens there: R4U is down

    def new_proxy(self, name: str, workdir: Path | None = None):
        from tests.harness import Mitmdump

        opts = {"stream_large_bodies": "1"}
        args: tuple[str, ...] = ()
        if name != "plain":
            opts["r4u_hosts"] = f"127.0.0.1:{self.up_port}=openai"
            args = ("--set", f"r4u_hosts=127.0.0.1:{self.probe_port}=openai")  # a sequence: appended
        if name == "plain":
            m = Mitmdump(self.tmp / name, upstream_port=self.up_port, addon=False, options=opts)
        else:
            url = f"http://127.0.0.1:{self.r4u_port if name in ('addon', 'drain') else self.down_port}"
            m = Mitmdump(workdir or self.tmp / name, r4u_url=url, upstream_port=self.up_port, options=opts,
                         args=args)
        self.children.proxy(m)
        pin(m.proc.pid, self.pin_proxy)
        if name != "plain":  # its delivery process: on the proxy's core (SCHED_IDLE) or beside the client
            deadline = time.monotonic() + 10
            while not descendants(m.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            for child in descendants(m.proc.pid):
                pin(child, self.pin_proxy if self.args.deliverer_core == "proxy" else self.pin_rest)
        return m

    def make_setups(self) -> None:
        os.sched_setaffinity(0, self.pin_rest or os.sched_getaffinity(0))
        conns = max(self.prof.conc) + 8
        url = f"https://127.0.0.1:{self.up_port}{CHAT_PATH}"
        probe_url = f"https://127.0.0.1:{self.probe_port}{CHAT_PATH}"
        self.setups: dict[str, Setup] = {"direct": Setup("direct", make_client(None, self.up_cert, conns), url)}
        for name in ("plain", "addon", "down"):
            m = self.new_proxy(name)
            self.setups[name] = Setup(name, make_client(m.url, str(m.ca_file), conns), url, m, m.proc.pid)
        for name, s in self.setups.items():
            s.probe = Probe(self.children, name, s.proxy.url if s.proxy else None,
                            str(s.proxy.ca_file) if s.proxy else self.probe_cert, probe_url, self.pin_rest)
            s.sent += 1  # its warm-up request

    async def close_clients(self) -> None:
        for s in getattr(self, "setups", {}).values():
            try:
                await s.client.aclose()
            except Exception:  # noqa: BLE001
                pass

    # Measuring a setup ---------------------------------------------------------------------------

    @staticmethod
    def cpu(s: Setup) -> tuple[float, float]:
        """CPU seconds so far: (mitmdump alone, all processes); direct: nothing to count."""
        return tree_cpu(s.pid) if s.pid else (0.0, 0.0)

    @staticmethod
    def note_peak(s: Setup, phase: str) -> None:
        """The phase's peak RSS (VmHWM since the phase's reset): mitmdump alone, and + its deliverer."""
        alone, both = tree_mb(s.pid, "VmHWM")
        s.peaks[phase] = max(s.peaks.get(phase, 0.0), alone)
        s.tpeaks[phase] = max(s.tpeaks.get(phase, 0.0), both)

    # Waiting for quiet ---------------------------------------------------------------------------

    async def settle(self, s: Setup, timeout: float = 90) -> None:
        """Until the proxy (and the fake R4U for the healthy addon) is idle again: the deferred
        work of the last phase (record building, storing, posting) must not leak into the next."""
        if s.pid is None:
            return
        deadline = time.monotonic() + timeout
        if s.name == "addon":
            await self.r4u_log.wait("addon", s.sent - s.errors, timeout)
        elif s.name == "down":
            from r4u_mitm.spool import read_stats

            while time.monotonic() < deadline:
                try:
                    if read_stats(s.proxy.outbox)["pending"] >= s.sent - s.errors:
                        break
                except Exception:  # noqa: BLE001 - not there yet
                    pass
                await asyncio.sleep(0.05)

        def busy() -> list[float]:  # the proxy with its deliverer, and the fake R4U
            return [tree_cpu(s.pid)[1]] + ([cpu_seconds(self.r4u.pid)] if s.name == "addon" else [])

        last = busy()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            now = busy()
            if all(b - a <= 0.015 for a, b in zip(last, now)):
                return
            last = now

    # Phases --------------------------------------------------------------------------------------

    async def warm(self, s: Setup, n: int = 1) -> None:
        await asyncio.gather(*(stream_once(s, 1, "warm") for _ in range(n)))

    async def phase_ttft(self) -> None:
        p = self.prof
        per_block = max(1, p.short // p.short_blocks)
        for block in range(p.short_blocks):
            order = SETUPS[block % 4:] + SETUPS[:block % 4]
            for name in order:
                s = self.setups[name]
                cpu0 = self.cpu(s)
                for _ in range(per_block):
                    r = await stream_once(s, p.short_synth, "ttft")
                    if r.ok:
                        self.res[name]["ttft"].append(r.ttft_ms)
                        self.res[name]["short"].append((r.t_end - r.t0) * 1000)
                if s.pid:
                    await self.settle(s)  # the block's deferred work (records built, stored, posted) counts
                    cpu1 = self.cpu(s)
                    s.short_cpus.append((cpu1[0] - cpu0[0]) / per_block)
                    s.short_ocpus.append(round(cpu1[1] - cpu1[0] - cpu0[1] + cpu0[0], 6) / per_block)  # whole ticks
                    s.short_cpu = median(s.short_cpus)
                    s.short_tcpu = s.short_cpu + median(s.short_ocpus)
        self.log("TTFT: " + ", ".join(f"{n} {median(self.res[n]['ttft']):.2f} ms" for n in SETUPS))

    async def phase_long(self, s: Setup) -> None:
        p = self.prof
        stored0 = self.stored(s)
        if s.pid:
            reset_tree_peak(s.pid)
        cpu0 = self.cpu(s)
        r = await stream_once(s, p.long_events, "long")
        cpu1 = self.cpu(s)
        s.max_body = max(s.max_body, r.nbytes)
        # short streams for at least `after_long` seconds, and with the addon until the long stream's
        # record is stored (R4U down) or delivered: while the store thread builds and encodes it
        after = []
        t0 = time.perf_counter()
        for _ in range(20_000):
            elapsed = time.perf_counter() - t0
            if elapsed >= 30 or (elapsed >= p.after_long and self.stored(s) >= stored0 + r.nbytes * 0.8):
                break
            q = await stream_once(s, p.short_synth, "after")
            if q.ok:
                after.append(q.ttft_ms)
        self.res[s.name]["after"].extend(after)
        await self.settle(s)
        out = {"eps": math.nan, "mbps": math.nan, "cpu_us": math.nan, "cpu_def_us": math.nan,
               "tcpu_us": math.nan, "tcpu_def_us": math.nan}
        if r.ok and r.t_first:
            span = r.t_end - r.t_first
            out.update(eps=r.events / span, mbps=r.nbytes / span / MB, bytes=r.nbytes)
        if s.pid and r.events:
            cpu2 = self.cpu(s)
            # what the short streams after it cost is taken out, at their TTFT phase's rate: from
            # mitmdump's CPU and from that of the processes it started
            deferred = max(0.0, cpu2[0] - cpu1[0] - len(after) * s.short_cpu)
            others = (cpu2[1] - cpu2[0]) - (cpu1[1] - cpu1[0])
            tdeferred = deferred + max(0.0, others - len(after) * (s.short_tcpu - s.short_cpu))
            out.update(cpu_us=(cpu1[0] - cpu0[0]) / r.events * 1e6,
                       cpu_def_us=(cpu1[0] - cpu0[0] + deferred) / r.events * 1e6,
                       tcpu_us=(cpu1[1] - cpu0[1]) / r.events * 1e6,
                       tcpu_def_us=(cpu1[1] - cpu0[1] + tdeferred) / r.events * 1e6, deferred_s=deferred)
            self.note_peak(s, "long")
        self.res[s.name]["long"].append(out)
        self.log(f"long {s.name}: {fmt(out['eps'], 0)} ev/s, {fmt(out['cpu_us'])} us/ev "
                 f"({fmt(out['cpu_def_us'])} with the deferred work; all processes {fmt(out['tcpu_us'])}, "
                 f"{fmt(out['tcpu_def_us'])}), after: p99 {fmt(pct(after, 99), 2)} ms")

    def stored(self, s: Setup) -> float:
        """Response bytes of the long streams this setup's addon has stored (R4U down: in its
        outbox) or delivered; plain and direct: infinite (nothing to wait for)."""
        if s.name == "addon":
            return sum(r["b"] for r in self.r4u_log.select("addon", "long"))
        if s.name == "down":
            from r4u_mitm.spool import read_stats

            try:
                return read_stats(s.proxy.outbox)["pending_bytes"]
            except Exception:  # noqa: BLE001 - not there yet
                return 0.0
        return math.inf

    async def phase_conc(self, s: Setup, n: int) -> None:
        p = self.prof
        await self.warm(s, n)  # n open connections, so that the phase measures streaming
        await self.settle(s)
        if s.pid:
            reset_tree_peak(s.pid)
        cpu0 = self.cpu(s)
        s.probe.start(f"p{n}")  # short requests to the idle second fake while the streams flow
        try:
            rs = await asyncio.gather(*(stream_once(s, p.conc_synth, f"c{n}") for _ in range(n)))
        finally:
            cpu1 = self.cpu(s)
            got = s.probe.stop()
        s.max_body = max(s.max_body, *(r.nbytes for r in rs))
        probes = got.get("ttft", [])
        s.sent += got.get("sent", 0)
        good = [r for r in rs if r.ok]
        events = sum(r.events for r in rs)
        span = max(r.t_end for r in rs) - min(r.t0 for r in rs)
        fine = s.pid and events >= 5_000  # /proc/PID/stat counts 10 ms ticks: too coarse below ~5,000 events
        out = {"eps": events / span if good else math.nan, "ttft_p99": pct([r.ttft_ms for r in good], 99),
               "ttft_med": pct([r.ttft_ms for r in good], 50), "bytes": sum(r.nbytes for r in rs),
               "probe_p50": pct(probes, 50), "probe_p99": pct(probes, 99), "probes": len(probes),
               "cpu_us": (cpu1[0] - cpu0[0]) / events * 1e6 if fine else math.nan,
               "tcpu_us": (cpu1[1] - cpu0[1]) / events * 1e6 if fine else math.nan, "ok": len(good)}
        await self.settle(s)
        if s.pid:
            self.note_peak(s, f"c{n}")
        self.res[s.name]["conc"][n].append(out)
        self.log(f"c{n} {s.name}: {fmt(out['eps'], 0)} ev/s, TTFT p99 {fmt(out['ttft_p99'], 2)} ms, "
                 f"probe TTFT p50 {fmt(out['probe_p50'], 2)} p99 {fmt(out['probe_p99'], 2)} ms ({len(probes)})")

    async def phase_rr(self) -> None:
        """CPU per chunk and events/s, robustly: many medium streams, round-robin over the setups,
        so that a change in the machine's background load hits every setup alike."""
        p = self.prof
        for i in range(p.rr_rounds):
            order = SETUPS[i % 4:] + SETUPS[:i % 4]
            for name in (order if i % 2 == 0 else order[::-1]):
                s = self.setups[name]
                cpu0 = self.cpu(s)
                r = await stream_once(s, p.rr_events, "rr")
                cpu1 = self.cpu(s)
                await self.settle(s)  # the stream's deferred work: its exchange stored, its record built and posted
                cpu2 = self.cpu(s)
                s.max_body = max(s.max_body, r.nbytes)
                if r.ok and r.t_first:
                    per = 1e6 / r.events if s.pid else math.nan
                    self.res[name]["rr"].append({
                        "eps": r.events / (r.t_end - r.t_first),
                        "cpu_us": (cpu1[0] - cpu0[0]) * per, "tcpu_us": (cpu1[1] - cpu0[1]) * per,
                        "cpu_def_us": (cpu2[0] - cpu0[0]) * per, "tcpu_def_us": (cpu2[1] - cpu0[1]) * per})
        self.log("round-robin: " + ", ".join(
            f"{n} {median(x['cpu_us'] for x in self.res[n]['rr']):.1f} us/ev "
            f"(until idle: {median(x['cpu_def_us'] for x in self.res[n]['rr']):.1f}; all processes "
            f"{median(x['tcpu_def_us'] for x in self.res[n]['rr']):.1f})" for n in SETUPS if n != "direct"))

    async def run_a(self) -> None:
        self.t_start = time.monotonic()
        self.start_fakes()
        self.make_setups()
        for s in self.setups.values():
            await self.warm(s, 3)
            await self.settle(s)
            if s.pid:
                s.base_rss, s.base_trss = tree_mb(s.pid, "VmRSS")
        self.log("setups up; TTFT phase")
        for s in self.setups.values():
            if s.pid:
                reset_tree_peak(s.pid)
        await self.phase_ttft()
        for s in self.setups.values():
            if s.pid:
                self.note_peak(s, "ttft")
        await self.phase_rr()
        for rep in range(self.prof.reps):
            order = SETUPS[rep // 2 % 4:] + SETUPS[:rep // 2 % 4]
            order = order[::-1] if rep % 2 else order  # each proxy before and after each other one
            for name in order:
                await self.phase_long(self.setups[name])
            for n in self.prof.conc:
                for name in order:
                    await self.phase_conc(self.setups[name], n)
        await self.close_clients()

    # Part B: what reached R4U, the backlog and its drain ------------------------------------------

    async def run_b(self) -> None:
        from r4u_mitm.spool import read_stats

        b = self.b
        rows = self.r4u_log.select("addon")
        for phase in ("ttft", "after", "long", f"c{max(self.prof.conc)}"):
            lat = [(r["t"] - iso_ts(r["c"])) * 1000 for r in rows if r["p"] == phase]
            b[phase] = {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99)}
        b["sent_addon"] = self.setups["addon"].sent
        b["received_addon"] = len(rows)

        # The backlog: stop the R4U-down proxy, read its outbox, start a proxy on it with R4U up.
        down = self.setups["down"]
        t = time.perf_counter()
        self.children.stop_proxy(down.proxy)
        b["down_stop_s"] = time.perf_counter() - t
        stats = read_stats(down.proxy.outbox)
        b["backlog"] = stats["pending"]
        b["backlog_mb"] = stats["pending_bytes"] / MB
        b["down_sent"] = down.sent
        self.log(f"backlog {stats['pending']} records, {stats['pending_bytes'] / MB:.1f} MB; draining")
        t0 = time.time()
        m = self.new_proxy("drain", workdir=down.proxy.workdir)
        t_up = time.time()
        before = len(self.r4u_log.select("down"))
        ok = await self.r4u_log.wait("down", before + stats["pending"], self.prof.drain_timeout)
        got = sorted(r["t"] for r in self.r4u_log.select("down"))
        b["drain_ok"] = ok
        b["drained"] = len(got) - before
        if got:
            b["drain_s_from_start"] = got[-1] - t0
            b["drain_s_from_ready"] = got[-1] - t_up
            b["drain_first_s"] = got[0] - t_up
            b["drain_rps"] = b["drained"] / max(1e-6, got[-1] - t_up)
            b["drain_mbps"] = b["backlog_mb"] / max(1e-6, got[-1] - t_up)
        self.children.stop_proxy(m)
        after = read_stats(down.proxy.outbox)
        b["left"] = after["pending"]
        for s in self.setups.values():
            if s.proxy is not None and s.name != "down":
                self.children.stop_proxy(s.proxy)


# Part C: Delivery alone ------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _sample_parts(events: int) -> tuple[tuple[bytes, ...], tuple, tuple]:
    from tests.fakes.upstream import FakeUpstream, _Plan, _synth_chat

    pieces = tuple(_synth_chat(events, "gpt-4o-mini-2024-07-18", False))
    plan = _Plan(200, "text/event-stream; charset=utf-8", [], True)
    resp_headers = [("Transfer-Encoding", "chunked"), ("Connection", "keep-alive")]
    resp_headers += FakeUpstream()._headers(plan, {"path": CHAT_PATH})
    req_headers = [("host", "api.openai.com"), ("accept", "application/json"),
                   ("accept-encoding", "gzip, deflate"), ("authorization", "Bearer sk-bench-0000"),
                   ("content-type", "application/json"), ("user-agent", "OpenAI/Python 1.99.0"),
                   ("x-stainless-lang", "python"), ("x-stainless-package-version", "1.99.0"),
                   ("x-stainless-runtime", "CPython"), ("content-length", str(len(REQUEST_BODY)))]
    return pieces, tuple(resp_headers), tuple(req_headers)


def sample_exchange(events: int, *, ended_wall: float | None = None, duration: float = 1.5,
                    properties: dict | None = None):
    """A realistic streamed chat exchange: the fake upstream's synthetic stream and headers."""
    from r4u_mitm.pure.record import Exchange

    pieces, resp_headers, req_headers = _sample_parts(events)
    now_m = time.monotonic()
    ended_wall = time.time() if ended_wall is None else ended_wall
    started = now_m - duration
    step = (duration - 0.3) / max(1, len(pieces))
    return Exchange(
        trace_id=str(uuid.uuid4()), provider="openai", url=PROXIED_URL, method="POST",
        path=CHAT_PATH, request_headers=list(req_headers), request_body=REQUEST_BODY,
        started_wall=ended_wall - duration, started=started, ended=now_m, status_code=200,
        response_headers=list(resp_headers), headers_at=started + 0.25, stream=True, pieces=list(pieces),
        piece_times=[started + 0.3 + i * step for i in range(len(pieces))],
        wire_bytes=sum(map(len, pieces)), properties=dict(properties or {}),
    )


def run_c(prof: Profile, children: Children, tmp: Path, pin_sender: set[int] | None,
          pin_rest: set[int] | None, r4u_timed: tuple[int, R4ULog] | None, log) -> dict:
    from r4u_mitm.delivery.deliver import build
    from r4u_mitm.pure.record import build_record
    from r4u_mitm.pure.recordjson import encode_record as encode
    from r4u_mitm.spool import Spool, pack
    from tests.harness import free_port

    out: dict = {}
    # a realistic record of about 3 KB: a short chat stream with the fake's real headers
    sizes = {n: len(encode(build_record(sample_exchange(n), max_body_bytes=32 * MB))) for n in range(0, 12)}
    events = min(sizes, key=lambda n: abs(sizes[n] - 3072))
    out["record_bytes"] = sizes[events]
    path = tmp / "c-outbox.sqlite"
    options = {"max_body_bytes": 32 * MB, "redact": []}
    with Spool(path) as spool:
        t = time.perf_counter()
        for i in range(0, prof.deliver_n, 64):  # as the proxy's spool writer: pack, batches of up to 64
            spool.append([pack(sample_exchange(events), options) for _ in range(min(64, prof.deliver_n - i))])
        out["put_rps"] = prof.deliver_n / (time.perf_counter() - t)
        bodies = [build(row) for row in spool.claim(prof.deliver_n)]
        spool.release()
    log(f"C: spool filled with {prof.deliver_n} exchanges (records of {out['record_bytes']} B; "
        f"{out['put_rps']:,.0f} appends/s); draining")

    port = free_port()
    fake = children.spawn([sys.executable, "-m", "tests.fakes.r4u", "--port", str(port), "--quiet"],
                          tmp / "c-r4u.log", "listening")
    pin(fake.pid, pin_rest)
    url = f"http://127.0.0.1:{port}"
    try:
        out.update(_drain_spool(prof, path, url, fake.pid, pin_sender))
        log(f"C: {out['rps']:,.0f} records/s ({out['cpu_us']:.0f} us CPU per record in the deliverer)")
        out["bare"] = asyncio.run(_bare_posts(bodies, port, 8))
        log(f"C: bare asyncio posting {out['bare']['rps']:,.0f} records/s ({out['bare']['cpu_us']:.0f} us CPU)")
    finally:
        children.stop(fake)

    if r4u_timed is not None:
        port, rlog = r4u_timed
        out["latency"] = _paced(prof, events, tmp / "c-latency.sqlite", f"http://127.0.0.1:{port}", rlog, pin_sender)
        log("C: latency " + ", ".join(f"{r}/s p50 {v['p50']:.1f} ms" for r, v in out["latency"].items()))
    return out


def _deliverer(path: Path, url: str, pin_to: set[int] | None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "r4u_mitm.delivery.deliver", "--outbox", str(path), "--r4u-url", url,
                             "--drain-seconds", "0", "--parent"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    if pin_to:
        os.sched_setaffinity(proc.pid, pin_to)
    return proc


async def _bare_posts(bodies: list[bytes], port: int, conns: int) -> dict:
    """A reference, not r4u-mitm: the same bodies POSTed over `conns` keep-alive connections by a
    bare asyncio HTTP/1.1 loop (no outbox, no retries). What posting itself costs in Python."""
    queue = list(reversed(bodies))
    statuses: list[int] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                body = queue.pop()
                writer.write(b"POST /v1/http-traces HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json"
                             b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                statuses.append(int(head[9:12]))
        finally:
            writer.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conns))), timeout=max(60.0, len(bodies) / 200))
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ok = sum(1 for st in statuses if st == 201)
    return {"rps": ok / dt, "cpu_us": cpu / max(1, ok) * 1e6, "ok": ok}


def _drain_spool(prof: Profile, path: Path, url: str, fake_pid: int, pin_to: set[int] | None) -> dict:
    """The delivery process alone, from its start to an empty spool."""
    from r4u_mitm.spool import read_stats

    t0 = time.perf_counter()
    fake0 = cpu_seconds(fake_pid)
    proc = _deliverer(path, url, pin_to)
    deadline = t0 + max(60.0, prof.deliver_n / 100)
    pending = read_stats(path)["pending"]
    while pending and time.perf_counter() < deadline:
        time.sleep(0.02)
        pending = read_stats(path)["pending"]
    t1 = time.perf_counter()
    cpu, fake1 = cpu_seconds(proc.pid), cpu_seconds(fake_pid)
    delivered = read_stats(path)["delivered"]
    proc.stdin.close()
    proc.wait(30)
    done = prof.deliver_n - pending
    return {"rps": done / (t1 - t0), "seconds": t1 - t0, "left": pending, "delivered": delivered,
            "cpu_us": cpu / max(1, done) * 1e6, "cores": cpu / (t1 - t0), "fake_cores": (fake1 - fake0) / (t1 - t0)}


def _paced(prof: Profile, events: int, path: Path, url: str, rlog: R4ULog, pin_to: set[int] | None) -> dict:
    """Append exchanges at a steady rate as the proxy's spool writer does (and wake the
    deliverer), each completed 'now'; the timing fake R4U notes when it got each."""
    from r4u_mitm import wake
    from r4u_mitm.spool import Spool, pack

    options = {"max_body_bytes": 32 * MB, "redact": []}
    spool = Spool(path)
    waker = wake.Sender(path)
    proc = _deliverer(path, url, pin_to)
    time.sleep(1.0)  # its start and the start-up probe
    result = {}
    try:
        for rate, seconds in prof.latency:
            phase = f"lat{rate}"
            n = int(rate * seconds)
            t_start = time.perf_counter()
            for i in range(n):
                delay = t_start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                ex = sample_exchange(events, ended_wall=time.time(), properties={"setup": "delivery", "phase": phase})
                spool.append([pack(ex, options)])
                waker.send()
            deadline = time.monotonic() + 30
            while len(rlog.select("delivery", phase)) < n and time.monotonic() < deadline:
                time.sleep(0.02)
            lat = [(r["t"] - iso_ts(r["c"])) * 1000 for r in rlog.select("delivery", phase)]
            result[rate] = {"n": len(lat), "p50": pct(lat, 50), "p99": pct(lat, 99)}
    finally:
        proc.stdin.close()
        proc.wait(30)
        spool.close()
        waker.close()
    return result


# Part D: the pure parts -----------------------------------------------------------------------

def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_d(prof: Profile, tmp: Path, log) -> dict:
    import tracemalloc

    from r4u_mitm.proxy.tap import Tap
    from r4u_mitm.pure.record import build_record
    from r4u_mitm.pure.recordjson import encode_record as encode
    from r4u_mitm.pure.sse import SSEDecoder
    from r4u_mitm.spool import Spool, pack
    from tests.fakes.upstream import default_streams_dir, split_events

    out: dict = {}
    basic = (default_streams_dir() / "openai_chat" / "basic.sse").read_bytes()
    data = basic * max(1, (prof.sse_mb * MB) // len(basic))
    kb_pieces = [data[i:i + 1024] for i in range(0, len(data), 1024)]
    ev_pieces = split_events(data)

    def decode(pieces):
        def run():
            dec = SSEDecoder()
            n = 0
            for p in pieces:
                n += len(dec.feed(p))
            dec.finish()
            out["_events"] = n
        return run

    for name, pieces in (("1 KB pieces", kb_pieces), ("one-event pieces", ev_pieces)):
        sec = best_of(decode(pieces))
        out[f"sse {name}"] = {"mbps": len(data) / sec / MB, "eps": out["_events"] / sec, "events": out["_events"],
                              "mb": len(data) / MB}
    log(f"D: SSEDecoder {out['sse 1 KB pieces']['mbps']:.0f} MB/s in 1 KB pieces")

    ex = sample_exchange(prof.build_events, duration=30.0)
    body = ex.wire_bytes
    record_holder = {}
    sec = best_of(lambda: record_holder.__setitem__("r", build_record(ex, max_body_bytes=256 * MB)), 2)
    events = prof.build_events + 3
    record = record_holder.pop("r")
    enc = best_of(lambda: encode(record), 2)
    record = None
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    record = build_record(ex, max_body_bytes=256 * MB)
    peak_build = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.reset_peak()
    base2 = tracemalloc.get_traced_memory()[0]
    blob = encode(record)
    peak_encode = tracemalloc.get_traced_memory()[1] - base2
    tracemalloc.stop()
    out["build"] = {"events": events, "body_mb": body / MB, "ms": sec * 1000, "us_per_event": sec / events * 1e6,
                    "encode_ms": enc * 1000, "peak_build_mb": peak_build / MB, "peak_encode_mb": peak_encode / MB,
                    "blob_mb": len(blob) / MB}
    record = blob = None
    log(f"D: build_record {out['build']['us_per_event']:.2f} us/event")

    pieces = ex.pieces
    out["join_ms"] = best_of(lambda: b"".join(pieces)) * 1000
    ex = pieces = None
    gc.collect()

    # One short exchange (the TTFT phase's synth=N): what the store thread does for it.
    short = sample_exchange(prof.short_synth)
    reps = 300
    t = best_of(lambda: [build_record(short, max_body_bytes=32 * MB) for _ in range(reps)])
    rec = build_record(short, max_body_bytes=32 * MB)
    t_enc = best_of(lambda: [encode(rec) for _ in range(reps)])
    options = {"max_body_bytes": 32 * MB, "redact": []}
    with Spool(tmp / "d-outbox.sqlite") as spool:  # the proxy's whole store step: pack + one append
        t_put = best_of(lambda: [spool.append([pack(dataclasses.replace(short, trace_id=str(uuid.uuid4())), options)])
                                 for _ in range(reps)])
    out["short"] = {"events": prof.short_synth + 3, "build_us": t / reps * 1e6, "encode_us": t_enc / reps * 1e6,
                    "put_us": t_put / reps * 1e6, "bytes": len(encode(rec))}

    pieces = short.pieces * 4
    piece = pieces[5]
    n = prof.tap_calls

    def tap_run():
        tap = Tap(1 << 62)
        for _ in range(n):
            tap(piece)

    def ident_run():
        def ident(p):
            return p
        for _ in range(n):
            ident(piece)

    def loop_run():
        for _ in range(n):
            pass

    t_tap, t_ident, t_loop = best_of(tap_run), best_of(ident_run), best_of(loop_run)
    out["tap_ns"] = (t_tap - t_loop) / n * 1e9
    out["ident_ns"] = (t_ident - t_loop) / n * 1e9
    return out


# Report --------------------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("PASS" if ok else "MISS")


def build_report(bench: Bench, c: dict | None, d: dict | None, load: dict) -> tuple[str, list[tuple], dict]:
    prof = bench.prof
    R = bench.res
    fig: dict[str, dict] = {}
    for name in SETUPS:
        r = R[name]
        f = fig[name] = {}
        f["ttft_med"] = pct(r["ttft"], 50)
        f["ttft_p99"] = pct(r["ttft"], 99)
        f["short_med"] = pct(r["short"], 50)
        f["after_p99"] = pct(r["after"], 99)
        f["after_max"] = max(r["after"]) if r["after"] else math.nan
        for k in ("eps", "mbps", "cpu_us", "cpu_def_us", "tcpu_us", "tcpu_def_us"):
            f["long_" + k] = median(x.get(k, math.nan) for x in r["long"])
        f["long_bytes"] = max((x.get("bytes", 0) for x in r["long"]), default=0)
        for k in ("eps", "cpu_us", "tcpu_us", "cpu_def_us", "tcpu_def_us"):
            f["rr_" + k] = median(x[k] for x in r["rr"])
        for n in prof.conc:
            f[f"c{n}_eps"] = median(x["eps"] for x in r["conc"][n])
            f[f"c{n}_p99"] = median(x["ttft_p99"] for x in r["conc"][n])
            f[f"c{n}_cpu"] = median(x["cpu_us"] for x in r["conc"][n])
            f[f"c{n}_tcpu"] = median(x["tcpu_us"] for x in r["conc"][n])
            f[f"c{n}_probe50"] = median(x["probe_p50"] for x in r["conc"][n])
            f[f"c{n}_probe99"] = median(x["probe_p99"] for x in r["conc"][n])
            f[f"c{n}_bytes"] = max((x["bytes"] for x in r["conc"][n]), default=0)
        s = bench.setups[name]
        f["short_cpu_ms"] = s.short_cpu * 1000 if s.pid else math.nan
        f["short_tcpu_ms"] = s.short_tcpu * 1000 if s.pid else math.nan
        f["peak"] = max(s.peaks.values()) if s.peaks else math.nan
        f["tpeak"] = max(s.tpeaks.values()) if s.tpeaks else math.nan
        f["peaks"] = dict(s.peaks)
        f["tpeaks"] = dict(s.tpeaks)
        f["base_rss"] = s.base_rss
        f["base_trss"] = s.base_trss
        f["body_mb"] = s.max_body / MB
        f["errors"] = s.errors
        f["sent"] = s.sent
    P, A, D = fig["plain"], fig["addon"], fig["down"]
    big = max(prof.conc)
    judged_conc = [n for n in prof.conc if n >= 50]  # issue 12: 50 and 100 concurrent streams
    traced_mb = max(P["long_bytes"], P[f"c{big}_bytes"]) / MB

    def cmp_diff(key, limit=None, unit="ms"):
        return [(f"{x[key] - P[key]:+.2f} {unit}", None if limit is None else x[key] - P[key] <= limit) for x in (A, D)]

    def cmp_ratio(key, lo=None, hi=None, judge=True):
        out = []
        for x in (A, D):
            ratio = x[key] / P[key] if P[key] else math.nan
            ok = None if math.isnan(ratio) or not judge else ((lo is None or ratio >= lo) and (hi is None or ratio <= hi))
            out.append((f"{ratio:.3f}×", ok))
        return out

    rows = []  # (metric, direct, plain, addon, down, target, [(addon vs plain, ok), (down vs plain, ok)])

    def row(metric, key, digits, target="", cmps=None):
        if all(math.isnan(fig[n][key]) for n in SETUPS):
            return  # e.g. CPU per chunk of a phase too short for 10 ms ticks
        rows.append((metric, *(fmt(fig[n][key], digits) for n in SETUPS), target, cmps or []))

    # Targets are issue 12's; "proxy CPU" is mitmdump alone, "... all processes" adds every process it
    # started (its deliverer), the CPU of the issue's "all processes" figure
    row(f"TTFT median, ms ({prof.short} × synth={prof.short_synth})", "ttft_med", 2, "≤ plain +0.2 ms",
        cmp_diff("ttft_med", 0.2))
    row("TTFT p99, ms", "ttft_p99", 2, "≤ plain +0.5 ms", cmp_diff("ttft_p99", 0.5))
    row("short exchange, request → last byte, median, ms", "short_med", 2, "≤ plain +0.3 ms", cmp_diff("short_med", 0.3))
    row("proxy CPU per short exchange, ms", "short_cpu_ms", 2, "", cmp_diff("short_cpu_ms"))
    row("  ... all processes", "short_tcpu_ms", 2, "", cmp_diff("short_tcpu_ms"))
    row(f"1 stream ({prof.long_events:,} events): events/s", "long_eps", 0, "≥ 0.98× plain",
        cmp_ratio("long_eps", lo=0.98))
    row("1 stream: MB/s at the client", "long_mbps", 1, "", cmp_ratio("long_mbps", judge=False))
    row("proxy CPU µs per chunk (during the stream)", "long_cpu_us", 1, "≤ 1.03× plain",
        cmp_ratio("long_cpu_us", hi=1.03))
    row("  ... all processes", "long_tcpu_us", 1, "≤ 1.10× plain", cmp_ratio("long_tcpu_us", hi=1.10))
    row("proxy CPU µs per chunk, + deferred record work", "long_cpu_def_us", 1, "",
        cmp_ratio("long_cpu_def_us", judge=False))
    row("  ... all processes", "long_tcpu_def_us", 1, "", cmp_ratio("long_tcpu_def_us", judge=False))
    row(f"{prof.rr_rounds} × {prof.rr_events:,}-event streams, round-robin: events/s", "rr_eps", 0, "≥ 0.98× plain",
        cmp_ratio("rr_eps", lo=0.98))
    row("  ... proxy CPU µs per chunk (median)", "rr_cpu_us", 1, "≤ 1.03× plain", cmp_ratio("rr_cpu_us", hi=1.03))
    row("  ... all processes", "rr_tcpu_us", 1, "≤ 1.10× plain", cmp_ratio("rr_tcpu_us", hi=1.10))
    row("  ... proxy CPU, until idle (+ deferred work)", "rr_cpu_def_us", 1, "≤ 1.03× plain",
        cmp_ratio("rr_cpu_def_us", hi=1.03))
    row("  ... all processes, until idle", "rr_tcpu_def_us", 1, "≤ 1.10× plain", cmp_ratio("rr_tcpu_def_us", hi=1.10))
    row(f"TTFT p99 after the long stream (≥ {prof.after_long:g} s, until its record is stored), ms", "after_p99", 2, "",
        cmp_diff("after_p99"))
    row("  ... worst, ms", "after_max", 2, "≤ plain +10 ms", cmp_diff("after_max", 10.0))
    for n in prof.conc:
        row(f"{n} concurrent (synth={prof.conc_synth}): events/s", f"c{n}_eps", 0,
            "≥ 0.95× plain" if n in judged_conc else "", cmp_ratio(f"c{n}_eps", lo=0.95, judge=n in judged_conc))
        row(f"{n} concurrent: the streams' TTFT p99, ms", f"c{n}_p99", 1, "", cmp_diff(f"c{n}_p99"))
        if n >= 10:
            row(f"{n} concurrent: probe TTFT p50, ms", f"c{n}_probe50", 2, "", cmp_diff(f"c{n}_probe50"))
            row(f"{n} concurrent: probe TTFT p99, ms", f"c{n}_probe99", 2, "", cmp_diff(f"c{n}_probe99"))
        row(f"{n} concurrent: proxy CPU µs per chunk", f"c{n}_cpu", 1, "", cmp_ratio(f"c{n}_cpu", judge=False))
        row("  ... all processes", f"c{n}_tcpu", 1, "", cmp_ratio(f"c{n}_tcpu", judge=False))

    def rss_limit(x):  # issue 12: ≤ plain + 2 × the largest body traced + 40 MB
        return P["tpeak"] + 2 * x["body_mb"] + 40

    rss_target = f"≤ plain + 2 × {max(A['body_mb'], D['body_mb']):.1f} + 40"
    rows.append(("proxy peak RSS, MB (VmHWM, any phase)", "—", fmt(P["peak"], 0), fmt(A["peak"], 0), fmt(D["peak"], 0),
                 rss_target, [(f"{x['peak'] - P['peak']:+.0f} MB", x["peak"] <= rss_limit(x)) for x in (A, D)]))
    rows.append(("  ... mitmdump + deliverer (VmHWM summed)", "—", fmt(P["tpeak"], 0), fmt(A["tpeak"], 0),
                 fmt(D["tpeak"], 0), rss_target,
                 [(f"{x['tpeak'] - P['tpeak']:+.0f} MB", x["tpeak"] <= rss_limit(x)) for x in (A, D)]))
    rows.append(("proxy RSS at rest after warm-up, MB", "—", fmt(P["base_rss"], 0), fmt(A["base_rss"], 0),
                 fmt(D["base_rss"], 0), "", cmp_diff("base_rss", unit="MB")))
    rows.append(("  ... mitmdump + deliverer", "—", fmt(P["base_trss"], 0), fmt(A["base_trss"], 0),
                 fmt(D["base_trss"], 0), "", cmp_diff("base_trss", unit="MB")))
    # R4U down ≈ healthy: the down proxy's figures within 5 % (TTFT: 0.2 ms / 1 ms; the worst short request
    # after the long stream: 10 ms) of the healthy one's, or better; throughput and CPU from the round-robin
    # streams (the steadiest figures of the run)
    def near(key, form, lo=None, hi=None, diff=False):
        """The down proxy's figure against the healthy one's (difference or ratio), and whether it is within `lo`..`hi`."""
        v = D[key] - A[key] if diff else (D[key] / A[key] if A[key] else math.nan)
        return form.format(v), None if math.isnan(v) else (lo is None or v >= lo) and (hi is None or v <= hi)

    checks = {"TTFT median": near("ttft_med", "{:+.2f} ms", hi=0.2, diff=True),
              "TTFT p99": near("ttft_p99", "{:+.2f} ms", hi=1.0, diff=True),
              "events/s": near("rr_eps", "{:.3f}×", lo=0.95),
              "CPU": near("rr_cpu_def_us", "{:.3f}×", hi=1.05),
              "CPU, all processes": near("rr_tcpu_def_us", "{:.3f}×", hi=1.05),
              "worst after the long stream": near("after_max", "{:+.1f} ms", hi=10.0, diff=True)}
    for n in judged_conc:
        checks[f"{n} streams' events/s"] = near(f"c{n}_eps", "{:.3f}×", lo=0.95)
    down_ok = None if any(ok is None for _, ok in checks.values()) else all(ok for _, ok in checks.values())
    summary = {"down_ok": down_ok, "fig": fig, "traced_mb": traced_mb}

    # ---- issue 12's targets, each proxy against plain; the figures are those of the rows above
    def judged(text, *values_and_ok):
        """A cell: its text, and PASS/MISS unless a figure is missing."""
        *values, ok = values_and_ok
        return text, None if any(v is None or math.isnan(v) for v in values) else ok

    def ratio(x, key):
        return x[key] / P[key] if P[key] else math.nan

    targets: list[tuple[str, str, tuple, tuple]] = []   # (metric, target, R4U up cell, R4U down cell)
    cells = []
    for x in (A, D):
        d50, d99 = x["ttft_med"] - P["ttft_med"], x["ttft_p99"] - P["ttft_p99"]
        cells.append(judged(f"{d50:+.2f} / {d99:+.2f} ms", d50, d99, d50 <= 0.2 and d99 <= 0.5))
    targets.append(("time to first event, median / p99", "+≤0.2 / +≤0.5 ms", *cells))
    cells = []
    for x in (A, D):
        dd = x["short_med"] - P["short_med"]
        cells.append(judged(f"{dd:+.2f} ms", dd, dd <= 0.3))
    targets.append(("short exchange, median", "+≤0.3 ms", *cells))
    cells = []
    for x in (A, D):
        r_all, r_alone = ratio(x, "rr_tcpu_def_us"), ratio(x, "rr_cpu_def_us")
        cells.append(judged(f"{r_all:.3f}× / {r_alone:.3f}×", r_all, r_alone, r_all <= 1.10 and r_alone <= 1.03))
    targets.append(("CPU per event, all processes / mitmdump alone", "≤1.10× / ≤1.03×", *cells))
    cells = []
    for x in (A, D):
        one, many = ratio(x, "long_eps"), [ratio(x, f"c{n}_eps") for n in judged_conc]
        cells.append(judged(f"{one:.3f}×; " + ", ".join(f"{v:.3f}×" for v in many), one, *many,
                            one >= 0.98 and all(v >= 0.95 for v in many)))
    targets.append((f"one stream; {' and '.join(map(str, judged_conc))} concurrent streams (events/s)",
                    "≥0.98×; ≥0.95×", *cells))
    cells = []
    for x in (A, D):
        dd = x["after_max"] - P["after_max"]
        cells.append(judged(f"{x['after_max']:.1f} ms ({dd:+.1f})", dd, dd <= 10.0))
    worst = f"worst first-event time of short requests while a {P['long_bytes'] / MB:.1f} MB stream's trace is processed"
    targets.append((worst, f"≤ plain's {P['after_max']:.1f} + 10 ms", *cells))
    cells = []
    for x in (A, D):
        cells.append(judged(f"{x['tpeak']:.0f} MB (≤ {rss_limit(x):.0f})", x["tpeak"], rss_limit(x),
                            x["tpeak"] <= rss_limit(x)))
    targets.append(("peak RSS, mitmdump + deliverer",
                    f"≤ plain {P['tpeak']:.0f} + 2 × {max(A['body_mb'], D['body_mb']):.1f} + 40 MB", *cells))
    rps = (c or {}).get("rps", math.nan)
    idle = (bench.b.get("ttft") or {}).get("p50", math.nan)
    targets.append(("delivery into a fast stand-in (part C) / end of stream → R4U has it, idle p50 (part B)",
                    "≥1,000 rec/s / <20 ms", judged(f"{fmt(rps, 0)} rec/s / {fmt(idle, 1)} ms", rps, idle,
                                                    rps >= 1000 and idle < 20), ("—", None)))
    targets.append(("the same with R4U down", "within noise of R4U up",
                    ("", None), ("; ".join(f"{k} {v[0]}" for k, v in checks.items()), down_ok)))
    summary["targets"] = targets

    # ---- text
    lines = []
    w = [48, 9, 9, 9, 9, 22, 16, 16]
    head = ["metric", "direct", "plain", "addon", "R4U down", "target", "addon vs plain", "down vs plain"]
    la = load.get("A", {})
    lines.append("A) proxy setups — fake OpenAI (TLS) → [proxy] → lean httpx client; "
                 f"medians of {prof.reps} run(s); other processes on the machine meanwhile: "
                 f"{fmt(la.get('mean'), 2)} cores on average (p90 {fmt(la.get('p90'), 2)}), steal {fmt(la.get('steal'), 2)}")
    lines.append("   proxy CPU: mitmdump alone; \"... all processes\": mitmdump and every process it started (its "
                 "deliverer), counted within each phase; targets: issue 12's")
    lines.append("  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(head)))
    lines.append("-" * (sum(w) + 2 * (len(w) - 1)))
    for r in rows:
        cells = [r[0].ljust(w[0])] + [str(v).rjust(w[i + 1]) for i, v in enumerate(r[1:5])] + [r[5].rjust(w[5])]
        for i, cell in enumerate(r[6]):
            cells.append(f"{cell[0]} {verdict(cell[1]) if cell[1] is not None else ''}".rstrip().rjust(w[6 + i]))
        lines.append("  ".join(cells).rstrip())
    lines.append("R4U down ≈ R4U healthy (TTFT +0.2/+1 ms, the worst short request after the long stream +10 ms; "
                 "round-robin events/s and CPU until idle, mitmdump alone and all processes, and "
                 f"{'/'.join(map(str, judged_conc))}-stream events/s, within 5 %; or better): {verdict(down_ok)}")
    lines.append("peak RSS per phase, MB, mitmdump alone / + deliverer: " + "; ".join(
        f"{n} " + ", ".join(f"{k} {v:.0f}/{fig[n]['tpeaks'].get(k, math.nan):.0f}" for k, v in fig[n]["peaks"].items())
        for n in ("plain", "addon", "down")))
    errs = {n: fig[n]["errors"] for n in SETUPS if fig[n]["errors"]}
    lines.append(f"streams: {', '.join(f'{n} {fig[n]['sent']}' for n in SETUPS)}; failed or short: "
                 f"{errs or 'none'}")
    b = bench.b
    lines.append("")
    lines.append("B) delivery through the proxy (addon → fake R4U in its own process; end = the record's completed_at)")
    for key, label in (("ttft", "short streams, one after another"),
                       ("after", "short streams right after the long one"),
                       (f"c{big}", f"{big} concurrent streams ending together"),
                       ("long", f"the {prof.long_events:,}-event stream")):
        v = b.get(key) or {"n": 0, "p50": math.nan, "p99": math.nan}
        ok = v["p50"] < 20 if key == "ttft" and v["n"] else None
        lines.append(f"  end of stream → R4U has it, {label} ({v['n']}): p50 {fmt(v['p50'], 1)} ms, "
                     f"p99 {fmt(v['p99'], 1)} ms" + (f"   [target p50 < 20 ms: {verdict(ok)}]" if ok is not None else ""))
    lines.append(f"  traced exchanges that reached R4U: {b['received_addon']}/{b['sent_addon']}")
    lines.append(f"  backlog after the R4U-down run: {b['backlog']} records, {b['backlog_mb']:.1f} MB "
                 f"(exchanges sent: {b['down_sent']}); stopping that proxy took {b['down_stop_s']:.1f} s")
    if b.get("drained"):
        lines.append(f"  drain by a restarted proxy with R4U up: {b['drained']} records in "
                     f"{b['drain_s_from_ready']:.2f} s from ready ({b['drain_s_from_start']:.2f} s from launch; "
                     f"first after {b['drain_first_s']:.2f} s): {b['drain_rps']:,.0f} records/s, "
                     f"{b['drain_mbps']:.1f} MB/s; left in the outbox: {b['left']}")
    else:
        lines.append(f"  drain: nothing drained within {prof.drain_timeout:g} s (left: {b.get('left')})")
    if c:
        lc = load.get("C", {})
        lines.append("")
        lines.append(f"C) Delivery alone: spool of {prof.deliver_n:,} exchanges (records of {c['record_bytes']:,} B) → "
                     f"python -m tests.fakes.r4u (own process); other processes meanwhile: {fmt(lc.get('mean'), 2)} cores")
        lines.append(f"  spool append (the proxy's writer: pack + commit, batches of 64): {c['put_rps']:,.0f} records/s")
        lines.append(f"  drain: {c['rps']:,.0f} records/s in {c['seconds']:.1f} s (left {c['left']}); "
                     f"{c['cpu_us']:.0f} µs CPU per record, {c['cores']:.2f} cores used by the deliverer, "
                     f"{c['fake_cores']:.2f} by the fake R4U   [target ≥ 1,000/s (issue 12), process start included: "
                     f"{verdict(c['rps'] >= 1000)}]")
        if c.get("bare"):
            lines.append(f"  reference, not r4u-mitm: the same bodies POSTed by a bare asyncio HTTP/1.1 loop "
                         f"(8 connections, no outbox): {c['bare']['rps']:,.0f} records/s, {c['bare']['cpu_us']:.0f} µs CPU per record")
        for rate, v in (c.get("latency") or {}).items():
            lines.append(f"  paced appends at {rate}/s ({v['n']}, the deliverer builds each record): end → R4U has it "
                         f"p50 {fmt(v['p50'], 1)} ms, p99 {fmt(v['p99'], 1)} ms"
                         f"   [target p50 < 20 ms: {verdict(v['p50'] < 20)}]")
    if d:
        lines.append("")
        lines.append("D) the pure parts (this process, best of 3)")
        for name in ("1 KB pieces", "one-event pieces"):
            v = d[f"sse {name}"]
            lines.append(f"  SSEDecoder, {v['mb']:.0f} MB in {name}: {v['mbps']:.1f} MB/s, {v['eps']:,.0f} events/s")
        v = d["build"]
        lines.append(f"  build_record, {v['events']:,} events ({v['body_mb']:.1f} MB): {v['ms']:.0f} ms = "
                     f"{v['us_per_event']:.2f} µs/event in the deliverer; then its json encode: "
                     f"{v['encode_ms']:.0f} ms")
        lines.append(f"    peak memory: build_record +{v['peak_build_mb']:.0f} MB, encode +{v['peak_encode_mb']:.0f} MB "
                     f"for a {v['body_mb']:.1f} MB body (its record's JSON: {v['blob_mb']:.1f} MB)")
        v2 = d["short"]
        lines.append(f"  one short exchange ({v2['events']} events, {v2['bytes']:,} B record): build_record "
                     f"{v2['build_us']:.0f} µs, encode {v2['encode_us']:.0f} µs, the proxy's store step (pack + commit) "
                     f"{v2['put_us']:.0f} µs")
        lines.append(f"  Tap.__call__: {d['tap_ns']:.0f} ns per piece (a bare Python call: {d['ident_ns']:.0f} ns)")
        lines.append(f"  the response hook's b''.join of {v['events']:,} pieces (on the event loop): {d['join_ms']:.1f} ms")
    lines.append("")
    lines.append("Targets (issue 12; each proxy against plain mitmdump --set stream_large_bodies=1 in this run; "
                 "CPU: mitmdump and every process it started / mitmdump alone)")
    table = [("metric", "target", "R4U up", "R4U down")]
    table += [(m, t, *(f"{cell[0]} {verdict(cell[1]) if cell[1] is not None else ''}".strip() for cell in cells))
              for m, t, *cells in targets]
    tw = [max(len(r[i]) for r in table) for i in range(3)]
    for i, r in enumerate(table):
        lines.append("  ".join([r[0].ljust(tw[0]), r[1].ljust(tw[1]), r[2].ljust(tw[2]), r[3]]).rstrip())
        if i == 0:
            lines.append("-" * (sum(tw) + 6 + len(table[1][3])))
    lines.append("  CPU per event: the round-robin streams from request to idle (deferred work included); RSS: the "
                 "largest body each proxy traced; delivery: R4U up only; R4U down vs up: within 5 % (TTFT 0.2 / 1 ms, "
                 "worst 10 ms) or better")
    return "\n".join(lines), rows, summary


def machine() -> dict:
    import mitmproxy.version

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / MB
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    commit = "unknown"
    try:  # read-only: no index refresh
        git = ["git", "--no-optional-locks", "-C", str(ROOT)]
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["diff-index", "--quiet", "HEAD", "--", "r4u_mitm"], timeout=10).returncode
        if head.returncode == 0:
            commit = head.stdout.strip() + (" + uncommitted changes in r4u_mitm/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nproc": nproc, "cpu": model, "ram_gb": ram, "python": platform.python_version(),
            "mitmproxy": mitmproxy.version.VERSION, "kernel": platform.release(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit}


def write_markdown(path: Path, text: str, rows, targets, meta: dict, args, runtime: float, png: Path) -> None:
    md = ["# Benchmarks", "",
          f"Produced by `{meta['command']}` on {meta['date']} in {runtime:.0f} s (profile `{args.profile}`). "
          "Re-run it to refresh this page (`--quick`: under a minute; `--long`: more and longer runs). "
          "The VM is small and shared: compare setups within one run (ratios, differences), not runs "
          "with each other; the report says how busy other processes kept the machine meanwhile.", "",
          "| machine | |", "|---|---|",
          f"| CPUs (`nproc`) | {meta['nproc']} |", f"| CPU model | {meta['cpu']} |",
          f"| RAM | {meta['ram_gb']:.1f} GiB |", f"| kernel | {meta['kernel']} |",
          f"| Python | {meta['python']} |", f"| mitmproxy | {meta['mitmproxy']} |",
          f"| pinning | {meta['pinning']} |", f"| code measured | {meta['commit']} |", "",
          f"![TTFT, events/s and CPU per chunk per setup]({png.name})", "",
          "## A) The proxy setups", "",
          "The fake OpenAI (`tests/fakes/upstream.py`, HTTP/1.1 over TLS, one write per event, `synth=N` chat "
          "streams, in its own process) → the setup → a lean `httpx.AsyncClient` that counts events "
          "(`\\n\\n`, also across reads) as their bytes arrive. **direct**: no proxy. **plain**: `mitmdump "
          "--set stream_large_bodies=1`, no addon — the fair baseline, since the addon streams too. "
          "**addon**: plus `-s r4u_mitm/addon.py` and a healthy fake R4U (own process, standing for a backend on "
          "another machine: it runs under SCHED_IDLE). **R4U down**: the "
          "addon posting to a port nobody listens on. Through a proxy the client asks for the fake's own "
          "address (`r4u_hosts=127.0.0.1:PORT=openai`): rerouting `api.openai.com` with "
          "`tests/fakes/route.py` defeats mitmproxy's upstream connection reuse (see the module docstring "
          "of `scripts/bench.py`).", "",
          "* TTFT: request sent → first complete event at the client; short streams one after another on "
          "a kept-alive connection, in blocks interleaved across the setups. \"Proxy CPU per short "
          "exchange\" includes the addon's deferred work (record built, stored, posted).",
          "* Proxy CPU: utime+stime of the mitmdump process alone (`/proc/PID/stat`, 10 ms ticks) during the "
          "stream, per event (the fake writes one event per write); \"+ deferred\" and \"until idle\" add "
          "what it spent after the stream ended until idle (the spool write). \"… all processes\" is issue "
          "12's CPU: mitmdump and every process it started — the live descendants' utime+stime (found through "
          "`/proc/PID/task/*/children`, recursively) plus mitmdump's cutime+cstime for those it reaped — sampled "
          "at each phase's start and end, so a deliverer that lives on, dies or restarts is counted for its "
          "time within the phase (record building and posting happen there).",
          "* After the long stream: short streams right after it, while the addon's spool writer stores that "
          "stream's raw exchange (its thread shares the GIL with the event loop) and the delivery process "
          "builds and posts its record.",
          "* Concurrent streams: total events/s at the client from the first request to the last byte. "
          "The streams' own TTFT p99 mostly measures the fake, which writes each stream as fast as its "
          "socket takes it (see *direct*); the **probe** rows are short requests to a second, idle fake "
          "made through the same proxy while the streams flow: the proxy's responsiveness under load.",
          "* Peak RSS: VmHWM, reset before each phase (`/proc/PID/clear_refs`), of mitmdump alone and summed "
          "with its deliverer's; the target allows plain's + 2 × the largest body the proxy traced + 40 MB.",
          "* Lines B, C and D are in the report below: B reads the fake R4U's receive time of each record "
          "against the record's `completed_at`; C drains a pre-filled spool with the delivery process "
          "into `python -m tests.fakes.r4u`, then appends exchanges at a steady rate; D times the pure "
          "modules in this process.", "",
          "| metric | direct | plain | addon | R4U down | target | addon vs plain | down vs plain |",
          "|---|--:|--:|--:|--:|---|---|---|"]
    for r in rows:
        cmps = [f"{c[0]} **{verdict(c[1])}**" if c[1] is not None else c[0] for c in r[6]]
        cmps += [""] * (2 - len(cmps))
        md.append("| " + " | ".join([r[0].strip().replace("...", "…"), *map(str, r[1:5]), r[5], *cmps]) + " |")
    md += ["", "## Targets (issue 12)", "",
           ("Each proxy against plain mitmdump in this run; the figures come from the rows above and from "
            "B and C below. CPU per event: the round-robin streams from request to idle."), "",
           "| metric | target | R4U up | R4U down |", "|---|---|---|---|"]
    for m, t, *cells in targets:
        md.append("| " + " | ".join([m, t, *(f"{c[0]} **{verdict(c[1])}**" if c[1] is not None else c[0]
                                             for c in cells)]) + " |")
    md += ["", "## The whole report, as printed", "", "```", text, "```", ""]
    path.write_text("\n".join(md))


def draw(path: Path, bench: Bench, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = summary["fig"]
    names = list(SETUPS)
    x = range(len(names))
    colors = ["#9e9e9e", "#4c72b0", "#55a868", "#c44e52"]
    f, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    wdt = 0.38
    med = [fig[n]["ttft_med"] for n in names]
    p99 = [fig[n]["ttft_p99"] for n in names]
    ax.bar([i - wdt / 2 for i in x], med, wdt, label="median", color=colors)
    ax.bar([i + wdt / 2 for i in x], p99, wdt, label="p99", color=colors, alpha=0.45, hatch="//")
    ax.set_xticks(list(x), [LABELS[n] for n in names], rotation=12)
    ax.set_ylabel("ms")
    ax.set_title(f"time to first event (synth={bench.prof.short_synth})\nsolid: median, hatched: p99")
    ax = axes[1]
    conc = list(bench.prof.conc)
    groups = [("1 long\nstream", "long_eps"), ("round-\nrobin", "rr_eps")] + [(f"{n} conc.", f"c{n}_eps") for n in conc]
    wdt = 0.8 / len(names)
    for j, n in enumerate(names):
        ax.bar([i + (j - 1.5) * wdt for i in range(len(groups))], [fig[n][k] / 1000 for _, k in groups], wdt,
               label=LABELS[n], color=colors[j])
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("thousand events/s at the client")
    ax.set_title("throughput")
    ax.legend(fontsize=8)
    ax = axes[2]
    groups = [("1 long\nstream", "long_cpu_us"), ("+ its\ndeferred", "long_cpu_def_us"),
              ("+ deferred,\nall procs", "long_tcpu_def_us"), ("round-\nrobin", "rr_cpu_us"),
              ("r-r to idle,\nall procs", "rr_tcpu_def_us")]
    groups += [(f"{n} conc.", f"c{n}_cpu") for n in conc]
    groups = [g for g in groups if not all(math.isnan(fig[n][g[1]]) for n in names[1:])]
    wdt = 0.8 / 3
    for j, n in enumerate(names[1:]):
        ax.bar([i + (j - 1) * wdt for i in range(len(groups))], [fig[n][k] for _, k in groups], wdt,
               label=LABELS[n], color=colors[j + 1])
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("µs of proxy CPU per chunk")
    ax.set_title("proxy CPU per chunk (event)\nmitmdump alone, or with its deliverer (\"all procs\")")
    ax.legend(fontsize=8)
    f.suptitle(f"r4u-mitm benchmark ({bench.prof.name}) — {summary['when']}", fontsize=10)
    f.tight_layout()
    f.savefig(path, dpi=110)
    plt.close(f)


# Main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        ap = argparse.ArgumentParser(prog="bench.py _probe")
        for name in ("--setup", "--url", "--ca"):
            ap.add_argument(name, required=True)
        ap.add_argument("--proxy", default="")
        a = ap.parse_args(argv[1:])
        return serve_probe(a.proxy, a.ca, a.url, a.setup)
    if argv[:1] == ["_r4u"]:
        ap = argparse.ArgumentParser(prog="bench.py _r4u")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--log", required=True)
        a = ap.parse_args(argv[1:])
        return serve_r4u(a.port, a.log)

    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick", help="under a minute")
    size.add_argument("--long", dest="profile", action="store_const", const="long", help="more and longer runs")
    ap.set_defaults(profile="default")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where benchmarks.md/.png go (default: docs/)")
    ap.add_argument("--no-docs", action="store_true", help="print only; write neither benchmarks.md nor .png")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the proxy and the rest to separate CPUs")
    ap.add_argument("--deliverer-core", choices=("proxy", "client"), default="proxy",
                    help="where A and B pin a proxy's delivery process: on the proxy's CPU (default: it runs "
                         "under SCHED_IDLE, in the proxy's gaps, so the tracer's whole cost stays on one core) or on the "
                         "client's and the fakes' CPU")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: c, d")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, outboxes)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    prof = PROFILES[args.profile]
    skip = {p.strip().lower() for p in args.skip.split(",") if p.strip()}

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    children = Children()
    t_run = time.monotonic()
    # the code under test, loaded now: the proxies start now too, so C and D measure the same code
    import importlib

    for module in ("spool", "pure.record", "delivery.deliver", "pure.sse", "proxy.tap"):
        importlib.import_module(f"r4u_mitm.{module}")
    tmp = Path(tempfile.mkdtemp(prefix="r4u-bench-"))
    meta = machine()
    meta["command"] = " ".join(["scripts/bench", *map(shlex.quote, argv)])
    bench = Bench(prof, args, children, tmp)
    meta["pinning"] = (f"each proxy on CPU 1, its delivery process on CPU {1 if args.deliverer_core == 'proxy' else 0}, "
                       "the client and the fake OpenAI on CPU 0, the fake R4U on any CPU under SCHED_IDLE "
                       "(the delivery process too); in C, "
                       "the deliverer on CPU 1 and the fake R4U on CPU 0" if bench.pin_proxy else "none (the scheduler's choice)")
    c = d = None
    load: dict = {}
    sampler = LoadSampler(children.pids).start()
    try:
        t0 = time.monotonic()
        bench.t_start = t0
        asyncio.run(bench.run_a())
        load["A"] = sampler.summary(t0, time.monotonic())
        asyncio.run(bench.run_b())
        if "c" not in skip:
            t0 = time.monotonic()
            try:
                c = run_c(prof, children, tmp, bench.pin_proxy, bench.pin_rest, (bench.r4u_port, bench.r4u_log),
                          bench.log)
            except Exception as exc:  # noqa: BLE001 - report what was measured anyway
                print(f"part C failed: {exc!r}", file=sys.stderr)
            load["C"] = sampler.summary(t0, time.monotonic())
        if "d" not in skip:
            try:
                d = run_d(prof, tmp, bench.log)
            except Exception as exc:  # noqa: BLE001
                print(f"part D failed: {exc!r}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: stopping every child process", file=sys.stderr)
        return 130
    finally:
        sampler.stop()
        children.kill_all()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"work directory kept: {tmp}", file=sys.stderr)
    runtime = time.monotonic() - t_run
    text, rows, summary = build_report(bench, c, d, load)
    header = (f"r4u-mitm benchmark ({prof.name}) — {meta['date']} — {meta['nproc']} CPUs {meta['cpu']}, "
              f"{meta['ram_gb']:.1f} GiB — Python {meta['python']}, mitmproxy {meta['mitmproxy']} — "
              f"commit {meta['commit']} — {runtime:.0f} s")
    print(header)
    print(text)
    if not args.no_docs:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary["when"] = meta["date"]
        png = out / "benchmarks.png"
        draw(png, bench, summary)
        write_markdown(out / "benchmarks.md", header + "\n\n" + text, rows, summary["targets"], meta, args, runtime,
                       png)
        print(f"wrote {out / 'benchmarks.md'} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
