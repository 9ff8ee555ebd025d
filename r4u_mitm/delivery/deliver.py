"""`r4u-mitm deliver`: the delivery process. Spool → records → R4U.

One deliverer per spool, held by an OS file lock (`<spool>.lock`); another one started on the
same spool waits (standby) until the lock is free. It claims due exchanges, builds each record
(`record.build_record`, with the options the proxy stored with the exchange) in a worker
thread, posts it to `{r4u_url}/v1/http-traces` with one `httpx.AsyncClient` (direct, never
through a proxy; TLS verified), several in flight, and settles it in the spool: deleted on 2xx,
tried again later or dead-lettered as `policy` says. R4U unreachable: the whole deliverer backs
off and probes (`GET /health`) until R4U answers (one warning when it goes, one line when it is
back). A post R4U took but did not answer within its deadline (`policy.answer_deadline`: it
grows with the record's size and retries) is probed after: R4U answering, only that record
waits for a later try.

Started by the addon with `--parent`: stdin is the proxy's lifeline (EOF: the proxy is gone,
however it ended), stdout carries newline-delimited JSON to the proxy: `{"log": level, "msg":
text}` and, with `--outcomes` (mitmweb, the console: someone sees the flow comments),
`{"trace": id, "outcome": ...}` (a dead letter's with its `"reason"`), nothing else per trace.
When the proxy is gone (or on SIGTERM/SIGINT when standalone) it goes on delivering for up to
`--drain-seconds`, lets the posts in flight finish (no re-send), and exits; what is left waits
for the next start.

Nothing is ever logged of a record's body or of the API key.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import random
import signal
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r4u_mitm import endpoint, wake
from r4u_mitm.delivery import policy
from r4u_mitm.pure import record
from r4u_mitm.pure.recordjson import Streamed, encode_record, is_big
from r4u_mitm.spool import DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, Row, Spool, SpoolBusy, SpoolClosed, unpack

log = logging.getLogger("r4u_mitm")

USER_AGENT = "r4u-mitm/0.1"
JSON_BODY = {"Content-Type": "application/json"}
SAFETY_POLL = 5.0        # seconds between two looks at the spool when no wake-up came
STANDBY_POLL = 0.25      # seconds between two tries of a lock another deliverer holds
WAKE_GATHER = 0.005      # seconds from a wake-up to the claim, in a burst: the exchanges that follow share it
BURST = 0.015            # seconds between two wake-ups that make a burst (a lone exchange is claimed at once)
COMMIT_GATHER = 0.02     # seconds outcomes pile up before one transaction writes them
BATCH = 64
# Bytes of exchanges claimed and not yet settled, at most (one exchange whatever its size when
# none is): a backlog of big streams is read a few at a time, not 64 bodies at once.
CLAIM_BYTES = 16 * 1024 * 1024
NICENESS = 10           # added to the deliverer's nice value: the proxy's flows come first
KEEPALIVE = 5.0         # seconds an idle connection to R4U is kept (httpx's default)
INLINE_BUILD = 64 * 1024  # bytes of bodies up to which a record is built on the loop (well under 1 ms)
# Bytes of bodies from which a record is streamed (`content`): measuring it first costs 1-3 ms a
# MB; below, the memory saved is a few MB.
STREAM_ABOVE = 4 * 1024 * 1024
INLINE_SPOOL = 256 * 1024  # bytes of exchanges up to which a claim or an outcome is written on the loop


def build(row: Row) -> bytes:
    """The JSON body to post for a claimed exchange."""
    rec = _record(row)
    return row.response_body if rec is None else encode_record(rec)


def content(row: Row) -> bytes | Streamed:
    """What is posted for a claimed exchange: `build`'s bytes; a big record's made slice by slice
    as they are sent (`Streamed`: its size measured first, its bytes never all in memory)."""
    rec = _record(row)
    if rec is None:
        return row.response_body
    big = len(row.response_body) + len(row.request_body) > STREAM_ABOVE and is_big(rec)
    return Streamed(rec) if big else encode_record(rec)


def _record(row: Row) -> dict | None:
    exchange, options = unpack(row)
    if exchange is None:  # a finished record from a version 1 outbox
        return None
    return record.build_record(exchange, **options)


async def _answer(response) -> bytes:
    """What of R4U's answer to a post is kept: the body of a refusal (it says why), at most
    `policy.ANSWER_READ`. A 2xx's (the stored trace, as long as the record) is read raw, past
    httpx's decoders, and dropped: nothing looks at it. An answer is read to its end, which keeps
    the connection for the next post, unless it is longer than that: then the connection is
    closed instead (a 201 echoing a big record costs less so)."""
    kept, read = bytearray(), 0
    try:
        refusal = not response.is_success
        async for chunk in (response.aiter_bytes() if refusal else response.aiter_raw()):
            read += len(chunk)
            if refusal:
                kept += chunk
            if read > policy.ANSWER_READ:
                break
    finally:
        await response.aclose()
    return bytes(kept)


async def _slices(body: Streamed):
    """A streamed record's slices for httpx, each made on the loop (about a millisecond), the
    loop's other tasks (posts, wake-ups) running between two."""
    for part in body:
        yield part
        await asyncio.sleep(0)


class _Signal:
    """Wake whoever waits, without lost wake-ups: wait on the event taken *before* looking."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def fire(self) -> None:
        event, self.event = self.event, asyncio.Event()
        event.set()


async def _wait(event: asyncio.Event, timeout: float | None) -> None:
    if event.is_set():
        return
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


class Channel:
    """Messages to the proxy that started us (stdout, one JSON line each, from any thread);
    nothing once it is gone."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._lock:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except (OSError, ValueError):  # the proxy is gone (EPIPE): say nothing more
                self.enabled = False


class _ChannelHandler(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, rec: logging.LogRecord) -> None:
        try:
            self.channel.send({"log": rec.levelname.lower(), "msg": rec.getMessage()})
        except Exception:  # noqa: BLE001 - logging must never stop delivery
            pass


def _client(base_url: str, opts: argparse.Namespace, headers: dict, timeout):
    """The one httpx client of a deliverer: direct connections only (never through the proxy, or
    any proxy, by env), no redirects, one connection more than posts in flight (the probe's).
    Its transport is httpx's own over an httpcore pool on `aionet`'s asyncio streams (httpx takes
    no network backend: the pool is made here, with the options httpx would give it); a TLS
    context only for an https R4U (the system's CAs cost 20 ms of a start). R4U sets no cookies
    to send back: none are looked for (httpx would parse each answer's headers for them)."""
    import httpcore
    import httpx

    from r4u_mitm.delivery import aionet

    class Transport(httpx.AsyncHTTPTransport):
        def __init__(self, pool: httpcore.AsyncConnectionPool) -> None:
            self._pool = pool  # all that httpx's transport keeps; test_aionet checks that it is used

    class NoCookies(httpx.Cookies):
        def extract_cookies(self, response) -> None:
            pass

    tls = endpoint.ssl_context(opts.ca_file) if base_url.lower().startswith("https:") else None
    client = httpx.AsyncClient(headers=headers, timeout=timeout, trust_env=False, follow_redirects=False,
                               transport=Transport(httpcore.AsyncConnectionPool(
                                   ssl_context=tls, max_connections=opts.in_flight + 1,
                                   max_keepalive_connections=opts.in_flight + 1, keepalive_expiry=KEEPALIVE,
                                   network_backend=aionet.Backend())))
    client._cookies = NoCookies()
    return client


class Worker:
    """Delivery of one spool, once its lock is held."""

    def __init__(self, spool: Spool, opts: argparse.Namespace, channel: Channel, stopping: asyncio.Event) -> None:
        self.spool = spool
        self.opts = opts
        self.channel = channel
        self.stopping = stopping
        self.base_url, self.post_url, self.probe_url = endpoint.traces_urls(opts.r4u_url)
        self.shown_url = endpoint.safe_url(self.base_url)
        self.db = ThreadPoolExecutor(1, thread_name_prefix="r4u-spool")
        self.db_jobs = 0  # calls queued for or running in the spool's thread
        self.builder = ThreadPoolExecutor(1, thread_name_prefix="r4u-build")
        self.loop = asyncio.get_running_loop()
        self.wake = _Signal()
        self.kick = _Signal()
        self.posted = asyncio.Event()  # set when an exchange's outcome is known (`_add`)
        self.held = 0  # bytes of the exchanges claimed and not yet settled (see CLAIM_BYTES)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=BATCH)
        self.results: tuple[list, list, list, list] = ([], [], [], [])  # Spool.settle's, in its order
        self.results_bytes = 0  # the size of the exchanges they settle
        self.results_ready = asyncio.Event()
        self.in_flight = 0
        self.pause_until = 0.0
        self.woke_at = 0.0
        self.failures = 0
        self.probe_lock = asyncio.Lock()
        self.deadline: float | None = None
        self.gave_up = False
        self.closing = False
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.record_errors = 0
        self.internal_errors = 0
        self.poisoned = 0
        self.misconfig_logged: set[int] = set()
        self.state_dirty = True
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if os.environ.get("R4U_API_KEY"):
            headers["X_API_KEY"] = os.environ["R4U_API_KEY"]
        import httpx  # here, once the lock is held: a deliverer standing by stays light

        self.httpx = httpx
        self.client = _client(self.base_url, opts, headers, self._timeout(opts.timeout))  # a post: its own deadline
        # A post's URL and headers, merged once: `client.post` merges them again for every
        # record (~50 µs, 5 % of the deliverer's CPU).
        template = self.client.build_request("POST", self.post_url, headers=JSON_BODY)
        del template.headers["Content-Length"]  # each record's own, from its body
        self.post_template = template

    def _timeout(self, answer: float):
        """Connecting: `--connect-timeout`; sending and answering: `answer` seconds (each)."""
        return self.httpx.Timeout(answer, connect=self.opts.connect_timeout, pool=None)

    async def _db(self, fn, *args):
        self.db_jobs += 1
        try:
            return await self.loop.run_in_executor(self.db, fn, *args)
        finally:
            self.db_jobs -= 1

    def _inline(self, size: int) -> bool:
        """Whether spool work on `size` bytes of exchanges runs here, on the loop: when small
        and the spool's thread is idle (its lock free). A trip to that thread and back costs
        more than a small claim or outcome (two of them were a sixth of a lone record's CPU)."""
        return size <= INLINE_SPOOL and not self.db_jobs

    # Running --------------------------------------------------------------------------------------

    async def run(self, sock) -> None:
        self.loop.add_reader(sock.fileno(), self._datagrams, sock)
        await self._db(self.spool.make_due)  # a new run: what waited for a later attempt is due now
        await self._save_state()
        await self._probe_at_start()
        posters = [asyncio.create_task(self._post_loop()) for _ in range(self.opts.in_flight)]
        committer = asyncio.create_task(self._commit_loop())
        stop_watch = asyncio.create_task(self._watch_stop())
        try:
            await self._feed()
        finally:
            for _ in posters:
                await self.queue.put(None)
            await asyncio.gather(*posters, return_exceptions=True)  # posts in flight finish
            self.closing = True  # the committer ends after the batch it is writing (never cancelled mid-way)
            self.results_ready.set()
            stop_watch.cancel()
            await asyncio.gather(committer, stop_watch, return_exceptions=True)
            self.loop.remove_reader(sock.fileno())
            await self._commit()
            await self.client.aclose()
            left = await self._db(self.spool.pending_count)
            if left:
                log.info("r4u-mitm: %d trace(s) stay in %s; they are delivered on the next start", left,
                         self.spool.path)
            self.state_dirty = True
            await self._save_state(running=False)
            self.db.shutdown()
            self.builder.shutdown()

    async def _watch_stop(self) -> None:
        await self.stopping.wait()
        self.wake.fire()
        self.kick.fire()

    def _datagrams(self, sock) -> None:
        while True:
            try:
                message = sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if message == wake.FLUSH:
                self.loop.create_task(self._flush())
            self.wake.fire()

    async def _flush(self) -> None:
        await self._db(self.spool.make_due)
        self.pause_until = 0.0
        self.failures = 0
        self.kick.fire()
        self.wake.fire()

    def _draining(self) -> bool:
        if self.stopping.is_set() and self.deadline is None:
            self.deadline = time.monotonic() + self.opts.drain_seconds
        return self.deadline is not None

    async def _feed(self) -> None:
        """Claim due exchanges into the queue; wait for a wake-up or the next due time when none."""
        while True:
            if self._draining():
                if time.monotonic() >= self.deadline:
                    return
            if not await self._gate():
                return
            woken = self.wake.event
            try:
                rows, due = await self._claim()
            except SpoolClosed:
                return
            except Exception as exc:  # noqa: BLE001 - a broken spool must not end delivery
                self._internal_error("claiming traces from the outbox", exc)
                await asyncio.sleep(1.0)
                continue
            claimed = len(rows)
            for row in rows:
                self.held += row.size
                await self.queue.put(row)
            rows = row = None  # the posters have them: not kept while we wait (a big body would stay)
            if claimed == BATCH:
                continue
            if due is not None and due <= time.time() and self.held:  # more due, past CLAIM_BYTES
                self.posted.clear()
                await _wait(self.posted, SAFETY_POLL)
                continue
            if self._draining():
                if not claimed and self.in_flight == 0 and self.queue.empty():
                    return
                if not claimed:
                    self.posted.clear()
                    await _wait(self.posted, 0.1)
                continue
            timeout = SAFETY_POLL if due is None else min(SAFETY_POLL, max(0.005, due - time.time()))
            await _wait(woken, timeout)
            if woken.is_set() and not self.stopping.is_set():
                now = time.monotonic()
                if now - self.woke_at < BURST:  # exchanges close together: one claim, one commit
                    await asyncio.sleep(WAKE_GATHER)
                self.woke_at = now

    async def _claim(self) -> tuple[list[Row], float | None]:
        """(Due exchanges, when the next unclaimed one is due): read on the loop when small, else
        in one trip to the spool's thread. A short batch took every due one: no second claim
        to find none; one appended since wakes us."""
        if self.db_jobs:
            return await self._db(self._take, None)
        ids, size = self._pick(self.spool.due(BATCH))
        if self._inline(size):
            return self._take(ids)
        return await self._db(self._take, ids)

    def _pick(self, due: list[tuple[int, int]]) -> tuple[list[int], int]:
        """(The ids of the due exchanges to claim now, their bytes): those that fit within
        CLAIM_BYTES beside what is held; the first one whatever its size when nothing is."""
        ids, size = [], 0
        for rowid, row_size in due:
            if self.held + size + row_size > CLAIM_BYTES and (ids or self.held):
                break
            ids.append(rowid)
            size += row_size
        return ids, size

    def _take(self, ids: list[int] | None) -> tuple[list[Row], float | None]:
        rows = self.spool.take(self._pick(self.spool.due(BATCH))[0] if ids is None else ids)
        return rows, (None if len(rows) == BATCH else self.spool.next_due())

    async def _post_loop(self) -> None:
        while True:
            row = await self.queue.get()
            if row is None:
                return
            if not await self._gate():
                continue  # a drain that gave up: the exchange stays in the spool
            try:
                await self._post(row)
            except Exception as exc:  # noqa: BLE001 - one exchange must not stop the others
                self._internal_error("posting a trace", exc)
                self._add(1, (row.id, time.time() + 5.0, policy.describe(exc)), row)
            del row  # not kept until the next one comes: a big stream's body would stay in memory

    async def _gate(self) -> bool:
        """Wait while the deliverer backs off; probe R4U before going on when it was unreachable.
        False: a drain gives up (R4U unreachable, or a pause beyond the deadline)."""
        while True:
            if self.gave_up:
                return False
            now = time.monotonic()
            if now < self.pause_until:
                if self._draining() and self.pause_until >= self.deadline:
                    self.gave_up = True
                    return False
                await _wait(self.kick.event, self.pause_until - now)
                continue
            if self.reachable is False:
                async with self.probe_lock:
                    if self.reachable is False and time.monotonic() >= self.pause_until:
                        error = await self._probe()
                        if error is None:
                            self._answered()
                        elif self._draining():
                            self.gave_up = True
                        else:
                            self._unreachable(error)
                            self._pause(None)
                continue
            return True

    def _pause(self, seconds: float | None) -> None:
        now = time.monotonic()
        if seconds is not None:
            self.pause_until = max(self.pause_until, now + seconds)
            return
        if now < self.pause_until:
            return  # posts that started before the pause: no escalation
        self.failures += 1
        self.pause_until = now + policy.backoff(self.failures, random.random(), self.opts.retry_base,
                                                self.opts.retry_cap)

    # Posting --------------------------------------------------------------------------------------

    async def _probe(self) -> str | None:
        """None when R4U answers (whatever the status), else why not."""
        try:
            response = await self.client.get(self.probe_url)
        except (self.httpx.TransportError, OSError, ssl.SSLError) as exc:
            return self._describe(exc, self.opts.timeout)
        if response.status_code in policy.NOT_THE_RECORD:
            self._misconfigured(response.status_code, policy.rejection_reason(
                response.status_code, response.reason_phrase, response.content))
        return None

    async def _probe_at_start(self) -> None:
        error = await self._probe()
        if error is None:
            self._answered()
        else:
            self._unreachable(error)
            self._pause(None)

    async def _post(self, row: Row) -> None:
        try:
            if len(row.response_body) + len(row.request_body) <= INLINE_BUILD:
                body = content(row)  # a handoff to the thread costs more, in GIL switches, than this
            else:
                body = await self.loop.run_in_executor(self.builder, content, row)
        except Exception as exc:  # noqa: BLE001 - kept raw in the dead-letter table: a later version can rebuild it
            reason = f"cannot build the record: {policy.describe(exc)}"
            self.record_errors += 1
            self._dirty()
            n = self.record_errors
            if n <= 10 or n % 1000 == 0:
                log.error("r4u-mitm: error building a trace record (trace %s) (%d so far; kept raw in the "
                          "dead-letter table of %s): %s", row.trace_id, n, self.spool.path, policy.describe(exc))
            self._add(2, (row.id, None, reason), row)
            self._tell(row.trace_id, "dead-lettered", reason)
            return
        deadline = policy.answer_deadline(len(body), row.attempts, self.opts.timeout)
        self.in_flight += 1
        try:
            post = self.post_template
            headers = post.headers
            if body.__class__ is Streamed:  # its Content-Length, known: httpx then sends no Transfer-Encoding
                headers = [*headers.raw, (b"Content-Length", b"%d" % len(body))]
            response = await self.client.send(self.httpx.Request(
                "POST", post.url, headers=headers, content=body if body.__class__ is bytes else _slices(body),
                extensions={"timeout": self._timeout(deadline).as_dict()}), stream=True)
            answer = await _answer(response)
        except (self.httpx.TransportError, OSError, ssl.SSLError) as exc:
            error = self._describe(exc, deadline)
            if await self._late_answer_alone(exc):  # a big record, a slow link or parse: a longer deadline later
                delay = policy.backoff(row.attempts + 1, random.random(), self.opts.retry_base, self.opts.retry_cap)
                self.last_error = error
                self._dirty()
                self._add(1, (row.id, time.time() + delay, error), row)
                self._tell(row.trace_id, f"retrying ({error})")
                return
            self._add(1, (row.id, time.time(), error), row)  # due again as soon as R4U answers
            self._unreachable(error)
            self._pause(None)
            self._tell(row.trace_id, "waiting for R4U")
            return
        finally:
            self.in_flight -= 1
        status = response.status_code
        decision = policy.decide(status, row.attempts, row.failures, response.headers.get("retry-after"),
                                 max_attempts=self.opts.max_attempts, now=time.time(), draw=random.random(),
                                 base=self.opts.retry_base, cap=self.opts.retry_cap)
        self._answered()
        if decision.action == "delivered":
            self.failures = 0
            self._add(0, row.id, row)
            self._tell(row.trace_id, "delivered")
            return
        reason = policy.rejection_reason(status, response.reason_phrase, answer)
        self.last_error = reason
        self._dirty()
        if decision.action == "retry":
            if decision.misconfigured:
                self._misconfigured(status, reason)
            self._add(3 if decision.failed else 1, (row.id, time.time() + decision.delay, reason), row)
            self._pause(decision.pause)
            self._tell(row.trace_id, f"retrying ({reason})")
            return
        self._add(2, (row.id, status, reason), row)
        self.poisoned += 1
        if self.poisoned <= 10 or self.poisoned % 100 == 0:
            what = f"failed {row.failures + 1} times on" if status >= 500 else "refused"
            log.warning("r4u-mitm: R4U %s trace %s (%s); it was moved to the dead-letter table of %s "
                        "(%d so far this run)", what, row.trace_id, reason, self.spool.path, self.poisoned)
        self._tell(row.trace_id, "dead-lettered", reason)

    async def _late_answer_alone(self, exc: BaseException) -> bool:
        """A post failed without an answer: was it that record's alone? Yes when R4U took it
        but did not answer within its deadline and answers its probe now; no when R4U could not
        be reached, or does not answer the probe either (then it is taken for down)."""
        if not isinstance(exc, self.httpx.TimeoutException) or isinstance(exc, self.httpx.ConnectTimeout):
            return False
        async with self.probe_lock:  # posts that timed out together: one probe at a time
            return self.reachable is not False and await self._probe() is None

    def _describe(self, exc: BaseException, deadline: float) -> str:
        if isinstance(exc, self.httpx.ConnectTimeout):
            return f"no connection within {self.opts.connect_timeout:g}s (ConnectTimeout)"
        if isinstance(exc, self.httpx.TimeoutException):
            return f"no answer within {round(deadline, 1):g}s ({type(exc).__name__})"
        return policy.describe(exc)

    def _tell(self, trace_id: str, outcome: str, reason: str | None = None) -> None:
        """What became of a trace, for its flow's comment in mitmweb; a dead letter says why
        (the reason its table keeps: short, never R4U's whole answer)."""
        if self.opts.outcomes:
            self.channel.send({"trace": trace_id, "outcome": outcome} | ({"reason": reason} if reason else {}))

    # Outcomes -------------------------------------------------------------------------------------

    def _add(self, kind: int, item, row: Row) -> None:
        self.results[kind].append(item)
        self.results_bytes += row.size
        self.held -= row.size
        self.posted.set()  # (a drain, or a claim waiting for room under CLAIM_BYTES, goes on)
        self.results_ready.set()

    async def _commit_loop(self) -> None:
        """Write outcomes in batches: whatever piled up while the previous batch was written."""
        while not self.closing:  # then run() writes what is left
            await self.results_ready.wait()
            if self.closing:
                return
            if self._more_coming() and sum(map(len, self.results)) < BATCH and not self.stopping.is_set():
                await asyncio.sleep(COMMIT_GATHER)  # fewer, larger transactions
            self.results_ready.clear()
            retried = await self._commit()
            if retried:
                self.wake.fire()  # exchanges to try again are claimable once settled

    def _more_coming(self) -> bool:
        """Posts in flight or queued: outcomes worth waiting for. None: a lone record's is
        written at once (a timer's wake-up saved, and 20 ms less before its claim is freed)."""
        return self.in_flight > 0 or not self.queue.empty()

    async def _commit(self) -> bool:
        batch, self.results = self.results, ([], [], [], [])
        size, self.results_bytes = self.results_bytes, 0
        if any(batch):
            try:
                if not (not batch[2] and self._inline(size) and self._settle_now(batch)):
                    await self._db(self.spool.settle, *batch)  # dead letters copy the exchanges
            except Exception as exc:  # noqa: BLE001 - the exchanges stay pending: sent again later
                self._internal_error("writing delivery outcomes to the outbox", exc)
        await self._save_state()
        return bool(batch[1] or batch[3])

    def _settle_now(self, batch) -> bool:
        """Outcomes written here, unless a proxy is writing to the spool (then False: the
        spool's thread waits for it, not the loop)."""
        try:
            self.spool.settle(*batch, wait=False)
        except SpoolBusy:
            return False
        return True

    async def _save_state(self, running: bool = True) -> None:
        if not self.state_dirty:
            return
        self.state_dirty = False
        state = {"pid": os.getpid(), "running": running, "reachable": self.reachable,
                 "last_error": self.last_error, "record_errors": self.record_errors, "updated_at": time.time()}
        try:
            await self._db(self.spool.set_state, state)
        except Exception as exc:  # noqa: BLE001
            self._internal_error("writing the deliverer's state", exc)

    # Bookkeeping and logs -------------------------------------------------------------------------

    def _dirty(self) -> None:
        """The state changed: the committer writes it (with the next outcomes, or alone)."""
        self.state_dirty = True
        self.results_ready.set()

    def _internal_error(self, what: str, exc: BaseException) -> None:
        self.internal_errors += 1
        n = self.internal_errors
        if n <= 10 or n % 1000 == 0:
            log.error("r4u-mitm: error %s (%d so far): %s", what, n, policy.describe(exc))

    def _unreachable(self, error: str) -> None:
        self.last_error = error
        self._dirty()
        if self.reachable is not False:
            self.reachable = False
            hint = "; set r4u_ca_file to R4U's CA" if "CERTIFICATE_VERIFY_FAILED" in error else ""
            log.warning("r4u-mitm: R4U is not answering at %s (%s%s); traces are kept in %s until it answers",
                        self.shown_url, error, hint, self.spool.path)

    def _answered(self) -> None:
        if self.reachable is False:
            log.info("r4u-mitm: R4U answers again at %s; delivering the traces kept in %s",
                     self.shown_url, self.spool.path)
        if self.reachable is not True:
            self.reachable = True
            self._dirty()

    def _misconfigured(self, status: int, reason: str) -> None:
        if status in self.misconfig_logged:
            return
        self.misconfig_logged.add(status)
        hint = "check R4U_API_KEY" if status in (401, 403, 407) else "check r4u_api_url"
        log.warning("r4u-mitm: R4U at %s answers %s (%s); traces are kept in %s and tried again",
                    self.shown_url, reason, hint, self.spool.path)


# The process --------------------------------------------------------------------------------------

async def _hold_lock(path: Path, stopping: asyncio.Event) -> int | None:
    """The spool's lock (a file descriptor), waiting while another deliverer holds it; None
    when we were told to stop before getting it."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if not said:
                log.debug("r4u-mitm: another deliverer holds %s; standing by", lock)
                said = True
        if stopping.is_set():
            os.close(fd)
            return None
        await _wait(stopping, STANDBY_POLL)


async def _serve(path: Path, opts: argparse.Namespace, channel: Channel, stopping: asyncio.Event) -> None:
    fd = await _hold_lock(path, stopping)
    if fd is None:
        return
    try:
        spool = Spool(path, max_records=opts.max_records, max_bytes=opts.max_mb * 1024 * 1024)
        sock = wake.bind(path)
        try:
            await Worker(spool, opts, channel, stopping).run(sock)
        finally:
            sock.close()
            spool.close()
    finally:
        os.close(fd)


async def _main(opts: argparse.Namespace, channel: Channel) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if opts.parent:
        def lifeline() -> None:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                stopping.set()

        loop.add_reader(0, lifeline)
    await asyncio.gather(*(_serve(Path(p).expanduser(), opts, channel, stopping) for p in opts.outbox))


def parser() -> argparse.ArgumentParser:
    from r4u_mitm.cli import DEFAULT_OUTBOX

    p = argparse.ArgumentParser(prog="r4u-mitm deliver", description=__doc__.split("\n\n")[0])
    p.add_argument("--outbox", action="append", default=None,
                   help=f"a spool to deliver (repeat for several; default: $R4U_OUTBOX or {DEFAULT_OUTBOX})")
    p.add_argument("--r4u-url", default=os.environ.get("R4U_API_URL", "http://localhost:8000"),
                   help="R4U's base URL (default: $R4U_API_URL or %(default)s); R4U_API_KEY is sent if set")
    p.add_argument("--ca-file", default=None, help="CA bundle for an https R4U (default: the system's)")
    p.add_argument("--drain-seconds", type=float, default=5.0,
                   help="on stop, how long to keep delivering (default: %(default)s)")
    p.add_argument("--max-records", type=int, default=DEFAULT_MAX_RECORDS)
    p.add_argument("--max-mb", type=int, default=DEFAULT_MAX_BYTES // (1024 * 1024))
    p.add_argument("--in-flight", type=int, default=8, help="posts in flight at most (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds R4U has to take a record and answer: this, plus 1 s per MB of the record, "
                        "doubled on each retry of it, 16 times at most (default: %(default)s)")
    p.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to connect to R4U (default: %(default)s)")
    p.add_argument("--max-attempts", type=int, default=5,
                   help="posts of a record R4U answers with a failure (a 500: its parser crashed) before it is "
                        "dead-lettered (default: %(default)s); outages are waited out without a cap")
    p.add_argument("--retry-base", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--retry-cap", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--parent", action="store_true",
                   help="started by a proxy: stdin EOF means it is gone; stdout carries messages to it")
    p.add_argument("--outcomes", action="store_true",
                   help="with --parent: also tell the proxy what became of each trace (for mitmweb's comments)")
    return p


def _lower_priority() -> None:
    """Yield the CPU to the proxy and the apps it serves: their flows cannot wait, records can
    (they are durable in the spool). Niced +10, a busy deliverer still takes ~10 % of a CPU the
    proxy needs; under Linux's SCHED_IDLE, ~0.3 % (measured: 0.90 vs 0.96-0.99 of one CPU left to
    a busy process beside it). Threads started later inherit it."""
    try:
        os.nice(NICENESS)
    except (AttributeError, OSError):  # no nice() (Windows), or not allowed: run as we are
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed: the nice value does it
        pass


def main(argv: list[str] | None = None) -> int:
    from r4u_mitm.cli import DEFAULT_OUTBOX

    args = parser()
    opts = args.parse_args(argv)
    if opts.max_attempts < 1:
        args.error(f"--max-attempts must be 1 or more, not {opts.max_attempts}")
    opts.outbox = opts.outbox or [os.environ.get("R4U_OUTBOX") or str(DEFAULT_OUTBOX)]
    try:
        endpoint.check_api_url(opts.r4u_url.strip())
        if opts.ca_file:  # the system's store cannot be wrong: loaded only for an https R4U
            endpoint.ssl_context(opts.ca_file)
    except endpoint.SetupError as exc:
        print(f"r4u-mitm deliver: --{exc.setting.replace('_', '-').replace('api-url', 'r4u-url')}: {exc}", file=sys.stderr)
        return 2
    _lower_priority()
    channel = Channel(opts.parent)
    handler = _ChannelHandler(channel) if opts.parent else logging.StreamHandler()
    if not opts.parent:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        asyncio.run(_main(opts, channel))
    except Exception as exc:  # noqa: BLE001 - one clear line for whoever started us
        log.error("r4u-mitm: the deliverer stopped: %s", policy.describe(exc))
        print(f"r4u-mitm deliver: {policy.describe(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
