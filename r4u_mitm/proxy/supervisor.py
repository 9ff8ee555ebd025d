"""The proxy's side of a spool: the writer thread that appends frozen exchanges, and the
deliverer process it starts, wakes and restarts. Knows neither records nor R4U.

What must survive mitmproxy's script reload lives here, in a package module (mitmproxy
re-executes `addon.py` on reload, not this): one `Link` per spool path, with the writer, the
deliverer, the memory budget of the taps, and the traces of the flows still open. A reloaded
addon takes the same link over: delivery goes on, and a stream in flight across the reload is
traced as complete.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from r4u_mitm import wake
from r4u_mitm.proxy.tap import Budget
from r4u_mitm.pure.record import Exchange
from r4u_mitm.spool import Spool, pack

log = logging.getLogger("r4u_mitm")

BATCH = 256               # exchanges written in one transaction at most
BURST = 0.020             # seconds: an exchange this close behind the last batch is part of a burst...
GATHER = 0.010            # ...and waits this long for those behind it (one transaction, commit and wake-up)
RESTART_FIRST, RESTART_MAX = 1.0, 60.0
DROP_LOG_EVERY = 10.0     # seconds between two "outbox full" warnings (the count is summed)
# Copying the write-ahead log into the database (a checkpoint) was a third of what storing a big
# stream cost this process: SQLite makes it in the connection whose commit finds the log past
# its limit, so the writer's limit is 64 MB (when no deliverer commits) and the deliverer's the
# default 4 MB: its commits (outcomes, its state, also while R4U is down) make them.
CHECKPOINT_PAGES = 16384
FREE_STEP = 4096          # pieces of a stored exchange freed at a time (~0.3 ms of GIL)
_STOP = object()


class SpoolWriter:
    """One daemon thread that appends exchanges to the spool in short transactions: the bodies
    are stored as they are (no decoding, no parsing, no JSON of bodies), a big one from its pieces,
    in steps that leave the GIL to the event loop in between (`spool.pack`, `Spool.append`).
    Exchanges that come in a burst (one after another, as an app's calls do) are gathered for
    `GATHER` and stored together: fewer commits, wake-ups of the deliverer and turns of the GIL
    per exchange, and less of this thread running while requests go through. `append` is a queue
    put: it returns at once, on the event loop. A write that fails (a full disk, a locked or
    broken file) is logged once per kind, counted, and the flows go on unchanged."""

    def __init__(self, path: Path, *, max_records: int, max_bytes: int, budget: Budget,
                 on_stored: Callable[[], None]) -> None:
        self.path = path
        self.max_records, self.max_bytes = max_records, max_bytes
        self.budget = budget
        self.on_stored = on_stored
        self.lost = 0                 # exchanges that could not be stored
        self.skipped = 0              # trace ids the spool had accepted before
        self._failures: dict[str, int] = {}
        self._dropped_unlogged = 0
        self._drop_logged_at = 0.0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._spool: Spool | None = None
        self._thread = threading.Thread(target=self._run, name="r4u-spool-writer", daemon=True)
        self._thread.start()

    def append(self, exchange: Exchange, options: dict, kept: int = 0) -> None:
        """Store `exchange` (its record is built with `options`); `kept` bytes of the budget are
        released once it is stored (or lost)."""
        self._queue.put((exchange, options, kept))

    def close(self, timeout: float) -> bool:
        """Store what is queued, within `timeout` seconds; True when all of it was."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        stop, last = False, -BURST
        while not stop:
            batch = [self._queue.get()]
            now = time.monotonic()
            if now - last < BURST:  # (a lone exchange is stored at once)
                time.sleep(GATHER)
            last = now
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._store(batch)
        if self._spool is not None:
            self._spool.close()

    def _store(self, batch: list) -> None:
        added = dropped = 0
        try:
            packed = []
            for exchange, options, _ in batch:
                if packed:
                    time.sleep(0)  # the GIL to the event loop between two
                packed.append(pack(exchange, options, joined=False))
            if self._spool is None:
                self._spool = Spool(self.path, max_records=self.max_records, max_bytes=self.max_bytes,
                                    checkpoint_pages=CHECKPOINT_PAGES)
            added, skipped, dropped = self._spool.append(packed)
            self.skipped += skipped
        except Exception as exc:  # noqa: BLE001 - a failed write must not stop the proxy
            self.lost += len(batch)
            self._failed(exc)
        finally:
            self.budget.released += sum(kept for _, _, kept in batch)
            _let_go(batch)
        if added:
            self.on_stored()
        if dropped:
            self._dropped_unlogged += dropped
            now = time.monotonic()
            if now - self._drop_logged_at >= DROP_LOG_EVERY:
                log.warning("r4u-mitm: the outbox %s is full (%d traces / %d MB at most): dropped the %d oldest "
                            "trace(s)", self.path, self.max_records, self.max_bytes // (1024 * 1024),
                            self._dropped_unlogged)
                self._dropped_unlogged, self._drop_logged_at = 0, now

    def _failed(self, exc: BaseException) -> None:
        kind, sentence = _failure(exc)
        n = self._failures[kind] = self._failures.get(kind, 0) + 1
        if n == 1 or n % 1000 == 0:
            log.error("r4u-mitm: cannot store traces in %s: %s (%s); the proxy goes on, these traces are lost "
                      "(%d so far)", self.path, sentence, " ".join(str(exc).split())[:200], self.lost)


def _let_go(batch: list) -> None:
    """Drop a batch's exchanges now (not when the next one comes), their pieces and piece times a
    slice at a time, the GIL to the event loop in between: freeing 100,000 pieces at once holds it
    for ~8 ms. The lists are the taps' own, which nothing reads once their exchange is frozen."""
    for exchange, _, _ in batch:
        for items in (exchange.pieces, exchange.piece_times):
            while items:
                del items[-FREE_STEP:]
                if items:
                    time.sleep(0)
    batch.clear()


def _failure(exc: BaseException) -> tuple[str, str]:
    """(kind, a sentence) for a failed write: a full disk is said as such."""
    text = str(exc).lower()
    cause = exc.__cause__ or exc
    if "full" in text or getattr(cause, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "full", "the disk (or this file's size limit) is full"
    if "locked" in text or "busy" in text:
        return "locked", "the file stays locked by another process"
    if isinstance(cause, (sqlite3.Error, OSError)):
        return "io", "the file cannot be written"
    return "bug", "an internal error"


class Deliverer:
    """The delivery process of one spool (`python -m r4u_mitm.delivery.deliver --parent`), started in a
    session of its own (a terminal's Ctrl-C is for mitmproxy), restarted with backoff if it dies
    while the proxy runs (logged once per distinct failure). Its stdin is the proxy's lifeline:
    closing it (or the proxy dying) lets it drain and exit. Its stdout lines are JSON messages
    (`on_message`, called on the reader thread)."""

    def __init__(self, spool: Path, args: list[str], on_message: Callable[[dict], None]) -> None:
        self.spool = spool
        self.args = args
        self.on_message = on_message
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._logged: set[str] = set()
        self._thread = threading.Thread(target=self._supervise, name="r4u-deliverer", daemon=True)
        self._thread.start()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "r4u_mitm.delivery.deliver", "--outbox", str(self.spool), *self.args, "--parent"]

    def stop(self) -> None:
        """Let it drain and exit on its own (stdin EOF); do not wait for it."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _supervise(self) -> None:
        delay = RESTART_FIRST
        while not self._stopping.is_set():
            started = time.monotonic()
            said: list[str] = []  # its last error message on stdout
            last: list[str] = []  # the last line it wrote to stderr (a traceback's, when it crashed)
            try:
                proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as exc:
                failure = f"cannot be started ({exc})"
            else:
                self.proc = proc
                if self._stopping.is_set():  # stopped while starting: let it go at once
                    proc.stdin.close()
                errors = threading.Thread(target=_last_lines, args=(proc.stderr, last), daemon=True)
                errors.start()
                for line in proc.stdout:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    if message.get("log") == "error":
                        said[:] = [message.get("msg", "")]
                    self.on_message(message)
                code = proc.wait()
                errors.join(5.0)  # stderr is read to its end: the same failure says the same thing
                proc.stdout.close()
                if self._stopping.is_set():
                    return
                last = last or said
                failure = f"exited (code {code}: {last[-1] if last else 'no message'})"
            if time.monotonic() - started > 2 * RESTART_MAX:
                delay = RESTART_FIRST
            key = failure.split("(", 1)[0] + (last[-1] if last else "")
            if key not in self._logged:
                self._logged.add(key)
                log.error("r4u-mitm: the deliverer %s; restarting in %gs; traces wait in %s", failure, delay,
                          self.spool)
            if self._stopping.wait(delay):
                return
            delay = min(RESTART_MAX, delay * 2)


def _last_lines(stream, out: list[str]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").strip()
        if line:
            out[:] = [line[:300]]
    stream.close()


class Link:
    """What the proxy keeps for one spool, across script reloads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.budget = Budget(512 * 1024 * 1024)
        self.open: dict = {}                       # flow id → flows.Trace, for flows in flight
        self.followed: OrderedDict = OrderedDict()  # trace id → (weakref to the flow, truncated)
        self.traced = 0
        self.internal_errors = 0
        self.writer: SpoolWriter | None = None
        self.deliverer: Deliverer | None = None
        self.on_outcome: Callable[[dict], None] | None = None  # the current addon's, on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waker = wake.Sender(path)

    @property
    def running(self) -> bool:
        return self.writer is not None

    def start(self, *, max_records: int, max_bytes: int, deliverer_args: list[str]) -> None:
        """Start the writer and the deliverer (from the event loop), or restart the deliverer
        when its options changed."""
        self._loop = asyncio.get_running_loop()
        if self.writer is None:
            self.writer = SpoolWriter(self.path, max_records=max_records, max_bytes=max_bytes, budget=self.budget,
                                      on_stored=self._waker.send)
        if self.deliverer is not None and self.deliverer.args != deliverer_args:
            self.deliverer.stop()
            self.deliverer = None
        if self.deliverer is None:
            self.deliverer = Deliverer(self.path, deliverer_args, self._message)

    def append(self, exchange: Exchange, options: dict, kept: int = 0) -> None:
        """Hand `exchange` to the writer thread; after `stop` (a hook firing late at shutdown),
        store it here and now instead, so that nothing is lost."""
        writer = self.writer
        if writer is not None:
            writer.append(exchange, options, kept)
            return
        try:
            with Spool(self.path) as spool:
                spool.append([pack(exchange, options, joined=False)])
        finally:
            self.budget.released += kept
        self._waker.send()

    def flush(self) -> None:
        self._waker.send(wake.FLUSH)

    def stop(self, timeout: float) -> bool:
        """Store what is queued (within `timeout`), then let the deliverer drain on its own."""
        stored = self.writer.close(timeout) if self.writer is not None else True
        if self.deliverer is not None:
            self.deliverer.stop()
        self.writer = self.deliverer = None
        return stored

    def _message(self, message: dict) -> None:
        """From the deliverer's reader thread: onto the event loop."""
        loop = self._loop
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError
            loop.call_soon_threadsafe(self._on_loop, message)
        except RuntimeError:
            if "log" in message:
                _relog(message)

    def _on_loop(self, message: dict) -> None:
        if "log" in message:
            _relog(message)
        elif self.on_outcome is not None and "trace" in message:
            self.on_outcome(message)


def _relog(message: dict) -> None:
    level = logging.getLevelName(str(message.get("log", "info")).upper())
    log.log(level if isinstance(level, int) else logging.INFO, "%s", message.get("msg", ""))


_links: dict[str, Link] = {}


def link_key(path: Path) -> str:
    return str(path.expanduser().resolve())


def link(path: Path) -> Link:
    """The link of the spool at `path`, made on first use."""
    key = link_key(path)
    found = _links.get(key)
    if found is None:
        found = _links[key] = Link(path.expanduser())
    return found


def forget(link_: Link) -> None:
    _links.pop(link_key(link_.path), None)
