"""Delivery: records → the outbox (store thread) → R4U (sender task on the event loop).

Knows nothing of mitmproxy flows or SSE. The addon calls `submit(make_record)`, which returns at
once; the record is built and stored on a dedicated store thread; the sender task claims due
records from the outbox and posts them to `{api_url}/v1/http-traces` over keep-alive connections
(`r4u_mitm.http1`, a small asyncio HTTP/1.1 client),
deleting each only after a 2xx. Every outbox call of the sender runs on the store thread too,
so the event loop never waits for SQLite.

Failures:
* R4U unreachable (connection refused, timeouts, broken connections): the whole sender backs off
  (exponential, with jitter, up to `retry_cap`), probes `GET {base}/v1/traces?limit=1`, and goes
  on when R4U answers. One warning when it goes away, one info line when it is back.
* 408, 429, 5xx, and answers that say R4U is misconfigured rather than the record wrong (3xx,
  401, 403, 404, 405, 407): the record is tried again later (Retry-After honoured), and the
  sender pauses a little so that a failing R4U is not hammered.
* Any other 4xx (422 above all): the record is poison; it moves to the dead-letter table with
  the status and a short reason (never R4U's whole answer: a 422 echoes the input).
Nothing is ever logged of a record's body or of the API key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import random
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

from r4u_mitm import http1
from r4u_mitm.outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_RECORDS, Outbox, OutboxClosed, read_stats

__all__ = ["Delivery", "SetupError", "traces_urls", "parse_retry_after", "rejection_reason"]

log = logging.getLogger("r4u_mitm")

USER_AGENT = "r4u-mitm/0.1"
RETRY_AFTER_MAX = 600.0          # a Retry-After beyond 10 minutes is taken as 10 minutes
REASON_MAX = 200
RETRYABLE = frozenset({408, 429})
# Answers about R4U's setup (wrong URL, auth, a redirect), not about the record: keep the record.
NOT_THE_RECORD = frozenset({401, 403, 404, 405, 407})
COMMIT_GATHER = 0.02            # seconds the committer waits for outcomes to pile up
JSON_BODY = {"Content-Type": "application/json"}
DROP_LOG_EVERY = 10.0            # seconds between two "outbox full" warnings (the count is summed)
_USERINFO = re.compile(r"^([^:/?#]*:)?//[^/?#]*@")  # user:password@ in a URL


def traces_urls(api_url: str) -> tuple[str, str, str]:
    """`(base, post_url, probe_url)` for a base URL given with or without a trailing `/v1`."""
    base = api_url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3].rstrip("/")
    return base, f"{base}/v1/http-traces", f"{base}/v1/traces?limit=1"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP-date), capped at 10 min."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        if math.isnan(seconds):
            return None
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def rejection_reason(response: http1.Response) -> str:
    """A short reason for a refusal: FastAPI's first `detail` item's `loc` and `msg` (never its
    `input`, which echoes the record), or the detail string, or the status phrase."""
    text = ""
    try:
        data = response.json() if len(response.content) <= 4 * 1024 * 1024 else None
    except ValueError:
        data = None
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        loc = ".".join(str(part) for part in first.get("loc") or ())
        msg = str(first.get("msg") or first.get("type") or "")
        text = f"{loc}: {msg}" if loc else msg
        if len(detail) > 1:
            text += f" (+{len(detail) - 1} more)"
    elif isinstance(detail, str):
        text = detail
    text = " ".join(text.split()) or response.reason_phrase
    return f"HTTP {response.status_code}: {text}"[:REASON_MAX]


def _backoff(n: int, base: float, cap: float) -> float:
    """The n-th delay (n >= 1): exponential, capped, with jitter (half fixed, half random)."""
    delay = min(cap, base * 2 ** min(max(n, 1) - 1, 30))
    return delay / 2 + random.random() * delay / 2


def _describe(exc: BaseException, timeout: float) -> str:
    """A short, secret-free description of a failure (its type, its message, the OS reason)."""
    if isinstance(exc, http1.Timeout):
        return f"no answer within {timeout:g}s ({type(exc).__name__})"
    text = " ".join(str(exc).split())
    cause, seen = exc.__cause__ or exc.__context__, 0
    while cause is not None and seen < 5:  # e.g. "All connection attempts failed" ← ECONNREFUSED
        if isinstance(cause, OSError) and cause.errno:
            text = f"{text} ({os.strerror(cause.errno)})" if text else os.strerror(cause.errno)
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return f"{type(exc).__name__}: {text}"[:REASON_MAX] if text else type(exc).__name__


class SetupError(ValueError):
    """A Delivery cannot be made with these settings: `setting` ("api_url" or "ca_file") names
    the one at fault, the message says why. (An unusable outbox raises `OutboxError`.)"""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def _safe_url(url: str) -> str:
    """The URL without any user:password in it (for logs and errors; a malformed URL too)."""
    return _USERINFO.sub(r"\1//", url, count=1)


def _check_api_url(api_url: str) -> None:
    """R4U's base URL must be absolute http(s), with a host and a valid port (else SetupError)."""
    shown = repr(_safe_url(api_url))
    try:
        parts = urlsplit(api_url)
    except ValueError as exc:  # e.g. an unbalanced [ in the host
        raise SetupError("api_url", f"invalid URL {shown}: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise SetupError("api_url", f"must be an http:// or https:// URL, not {shown}")
    if not parts.hostname:
        raise SetupError("api_url", f"no host in {shown}")
    try:
        parts.port
    except ValueError:
        raise SetupError("api_url", f"invalid port in {shown}") from None


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify R4U's certificate with `ca_file`, else the system's store (certifi's when the
    system has none, e.g. some macOS Pythons). Never unverified. A `ca_file` that cannot be
    read or holds no PEM certificate is a SetupError."""
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except ssl.SSLError as exc:  # before OSError: it is one
            reason = str(exc.strerror or exc).split(" (_ssl.c:")[0]
            raise SetupError("ca_file", f"{ca_file} is not a PEM CA bundle: {reason}") from None
        except OSError as exc:
            raise SetupError("ca_file", f"cannot read {ca_file}: {exc.strerror or exc}") from None
    context = ssl.create_default_context()
    if not context.cert_store_stats().get("x509_ca"):
        try:
            import certifi

            context.load_verify_locations(certifi.where())
        except (ImportError, OSError):
            pass
    return context


class _Signal:
    """Wake whoever waits, without lost wake-ups: wait on the event taken *before* looking."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()


async def _wait(event: asyncio.Event, timeout: float | None) -> None:
    if event.is_set():
        return
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


class _Results:
    """Outcomes of posts not yet written to the outbox (written in batches by the committer)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivered: list[int] = []
        self.retry: list[tuple[int, float, str]] = []
        self.dead: list[tuple[int, int | None, str]] = []
        self.closed = False

    def take(self, close: bool = False) -> tuple[list, list, list] | None:
        with self.lock:
            self.closed = self.closed or close
            if not (self.delivered or self.retry or self.dead):
                return None
            out = (self.delivered, self.retry, self.dead)
            self.delivered, self.retry, self.dead = [], [], []
            return out


class _Sender:
    """One run of the posting machinery: the long-lived sender task on the proxy's loop, or a
    shutdown drain on a private loop (`deadline` set). Same code for both."""

    def __init__(self, delivery: "Delivery", *, deadline: float | None = None) -> None:
        self.d = delivery
        self.deadline = deadline
        self.drain = deadline is not None
        self.loop = asyncio.get_running_loop()
        self.wake = _Signal()          # records may be due: look again
        self.kick = _Signal()          # flush: stop pausing
        self.results = _Results()
        self.results_ready = asyncio.Event()
        self.posted = asyncio.Event()  # a post ended (drain: look again)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=delivery.batch_size)
        self.client: http1.Client | None = None
        self.tasks: list[asyncio.Task] = []
        self.in_flight = 0
        self.pause_until = 0.0         # monotonic
        self.failures = 0              # consecutive pauses since the last 2xx
        self.probe_lock = asyncio.Lock()
        self.closed = False
        self.gave_up = False
        self.main_task: asyncio.Task | None = None   # the sender task that runs `run()`

    # Running --------------------------------------------------------------------------------------

    async def run(self) -> None:
        d = self.d
        self.client = d._make_client()
        try:
            if not self.drain:
                await self._probe_at_start()
            self.tasks = [asyncio.create_task(self._work(), name="r4u-post") for _ in range(d.max_in_flight)]
            self.tasks.append(asyncio.create_task(self._commit_loop(), name="r4u-commit"))
            if not self.drain and d.status_interval:
                self.tasks.append(asyncio.create_task(self._status_loop(), name="r4u-status"))
            await self._feed()
            for _ in range(d.max_in_flight):
                await self.queue.put(None)
            await asyncio.gather(*self.tasks[:d.max_in_flight])
        finally:
            for task in self.tasks:
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.drain:
                self._commit_now()
            try:
                await self.client.aclose()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def cancel(self) -> None:
        """Stop at once (from the loop's thread): no step of this run does anything after this."""
        self.closed = True
        for task in self.tasks:
            task.cancel()
        if self.main_task is not None:
            self.main_task.cancel()

    async def _db(self, fn: Callable, *args):
        """An outbox call: on the store thread for the sender, directly for a drain (it has its
        own thread and the store thread is gone)."""
        if self.closed:
            raise asyncio.CancelledError
        if self.drain:
            return fn(*args)
        result = await self.loop.run_in_executor(self.d._executor, functools.partial(fn, *args))
        if self.closed:
            raise asyncio.CancelledError
        return result

    async def _feed(self) -> None:
        """Claim due records into the queue; wait (for a wake-up or the next due time) when none."""
        d = self.d
        while not self.closed:
            if not await self._gate():
                return
            woken = self.wake.waiter()
            posted = self.posted
            try:
                rows = await self._db(d._outbox.claim, d.batch_size)
            except (OutboxClosed, RuntimeError):
                return
            except Exception as exc:  # noqa: BLE001 - a broken outbox must not end delivery
                d._internal_error("claiming traces from the outbox", exc)
                await asyncio.sleep(1.0)
                continue
            if rows:
                for row in rows:
                    await self.queue.put(row)
                continue
            if self.drain:
                if self.in_flight == 0 and self.queue.empty():
                    return
                posted.clear()
                await _wait(posted, 0.1)
                continue
            try:
                due = await self._db(d._outbox.next_due)
            except (OutboxClosed, RuntimeError):
                return
            except Exception as exc:  # noqa: BLE001
                d._internal_error("reading the outbox", exc)
                due = time.time() + 1.0
            await _wait(woken, None if due is None else min(60.0, max(0.005, due - time.time())))

    async def _work(self) -> None:
        while True:
            row = await self.queue.get()
            if row is None or self.closed:
                return
            if not await self._gate():
                continue  # a drain that gave up: the record stays in the outbox
            await self._post(row)

    async def _gate(self) -> bool:
        """Wait while the sender backs off; probe R4U before going on when it was unreachable.
        False: a drain gives up (R4U unreachable, or a pause beyond the deadline)."""
        while not self.closed:
            if self.gave_up:
                return False
            now = time.monotonic()
            if now < self.pause_until:
                if self.drain and self.pause_until >= self.deadline:
                    self.gave_up = True
                    return False
                await _wait(self.kick.waiter(), self.pause_until - now)
                continue
            if self.d._reachable is False:
                async with self.probe_lock:
                    if self.d._reachable is False and time.monotonic() >= self.pause_until and not self.closed:
                        error = await self._probe()
                        if error is None:
                            self.d._answered()
                        elif self.drain:
                            self.gave_up = True
                        else:
                            self.d._unreachable(error)
                            self._pause(None)
                continue
            return True
        return False

    def _pause(self, retry_after: float | None) -> None:
        now = time.monotonic()
        if retry_after is not None:
            self.pause_until = max(self.pause_until, now + retry_after)
            return
        if now < self.pause_until:
            return  # posts that started before the pause: no escalation
        self.failures += 1
        self.pause_until = now + _backoff(self.failures, self.d.retry_base, self.d.retry_cap)

    def flush_now(self) -> None:
        """`Delivery.flush()`, on the loop: no more pausing, look for due records now."""
        self.pause_until = 0.0
        self.failures = 0
        self.kick.fire()
        self.wake.fire()

    # Posting --------------------------------------------------------------------------------------

    async def _probe(self) -> str | None:
        """None when R4U answers (whatever the status), else why not."""
        try:
            response = await self.client.get(self.d._probe_url)
        except (OSError, ssl.SSLError) as exc:  # http1.TransportError and Timeout are OSErrors
            return _describe(exc, self.d.timeout)
        if response.status_code in NOT_THE_RECORD:
            self.d._misconfigured(response.status_code, rejection_reason(response))
        return None

    async def _probe_at_start(self) -> None:
        error = await self._probe()
        if error is None:
            self.d._answered()
        else:
            self.d._unreachable(error)
            self._pause(None)

    async def _post(self, row: tuple[int, str, bytes, int]) -> None:
        rowid, trace_id, body, attempts = row
        d = self.d
        self.in_flight += 1
        try:
            response = await self.client.post(d._post_url, content=body, headers=JSON_BODY)
        except (http1.TransportError, OSError, ssl.SSLError) as exc:
            error = _describe(exc, d.timeout)
            self._add_retry(rowid, time.time(), error)  # due again as soon as R4U answers
            d._unreachable(error)
            self._pause(None)
            self._tell(trace_id, "waiting for R4U")
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an invalid URL: keep the record, slow down
            error = _describe(exc, d.timeout)
            self._add_retry(rowid, time.time() + _backoff(attempts + 1, d.retry_base, d.retry_cap), error)
            d._note_error(error)
            d._internal_error("posting a trace", exc)
            self._pause(None)
            return
        finally:
            self.in_flight -= 1
            self.posted.set()
        status = response.status_code
        if 200 <= status < 300:
            self.failures = 0
            self._add_delivered(rowid)
            d._answered()
            self._tell(trace_id, "delivered")
            return
        d._answered()
        if status in RETRYABLE or status >= 500 or status < 200 or 300 <= status < 400 or status in NOT_THE_RECORD:
            reason = rejection_reason(response)
            if status in NOT_THE_RECORD or 300 <= status < 400:
                d._misconfigured(status, reason)
            retry_after = parse_retry_after(response.headers.get("retry-after")) if status in (429, 503) else None
            delay = max(retry_after or 0.0, _backoff(attempts + 1, d.retry_base, d.retry_cap))
            self._add_retry(rowid, time.time() + delay, reason)
            d._note_error(reason)
            self._pause(retry_after)
            self._tell(trace_id, f"retrying ({reason})")
            return
        reason = rejection_reason(response)
        self._add_dead(rowid, status, reason)
        d._poisoned(trace_id, reason)
        self._tell(trace_id, "dead-lettered")

    def _tell(self, trace_id: str, outcome: str) -> None:
        """Tell the owner (on the proxy's loop; not during a shutdown drain) what became of a trace."""
        if self.d._on_outcome is not None and not self.drain:
            try:
                self.d._on_outcome(trace_id, outcome)
            except Exception as exc:  # noqa: BLE001 - the owner's bug must not stop delivery
                self.d._internal_error("reporting a delivery outcome", exc)

    # Outcomes -------------------------------------------------------------------------------------

    def _add_delivered(self, rowid: int) -> None:
        with self.results.lock:
            if not self.results.closed:
                self.results.delivered.append(rowid)
        self.results_ready.set()

    def _add_retry(self, rowid: int, at: float, error: str) -> None:
        with self.results.lock:
            if not self.results.closed:
                self.results.retry.append((rowid, at, error))
        self.results_ready.set()

    def _add_dead(self, rowid: int, status: int, reason: str) -> None:
        with self.results.lock:
            if not self.results.closed:
                self.results.dead.append((rowid, status, reason))
        self.results_ready.set()

    async def _commit_loop(self) -> None:
        """Write outcomes in batches: whatever piled up while the previous batch was written."""
        while not self.closed:
            await self.results_ready.wait()
            if not self.drain and self._pending_results() < self.d.batch_size:
                await asyncio.sleep(COMMIT_GATHER)  # fewer, larger transactions
            self.results_ready.clear()
            batch = self.results.take()
            if batch is None:
                continue
            try:
                await self._db(self.d._outbox.settle, *batch)
                if batch[1]:
                    self.wake.fire()  # records to try again are claimable once settled
            except OutboxClosed:
                return
            except RuntimeError:  # the store thread is shut down: stop() writes what is left
                return
            except Exception as exc:  # noqa: BLE001 - the records stay pending: sent again later
                self.d._internal_error("writing delivery outcomes to the outbox", exc)

    def _pending_results(self) -> int:
        results = self.results
        return len(results.delivered) + len(results.retry) + len(results.dead)

    def _commit_now(self) -> None:
        batch = self.results.take(close=True)
        if batch is not None:
            try:
                self.d._outbox.settle(*batch)
            except OutboxClosed:  # a drain that overran its deadline: the records stay pending
                pass
            except Exception as exc:  # noqa: BLE001
                self.d._internal_error("writing delivery outcomes to the outbox", exc)

    async def _status_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.d.status_interval)
            try:
                stats = await self._db(self.d._outbox.stats)
            except (OutboxClosed, RuntimeError):
                return
            except Exception as exc:  # noqa: BLE001
                self.d._internal_error("reading the outbox", exc)
                continue
            self.d._status_line(stats, self)


class Delivery:
    """Gets records to R4U, durably: see the module docstring.

    Defaults are sized for a day of heavy use on a laptop: the outbox keeps up to 100,000 records
    and 1 GiB before dropping the oldest (counted, logged); 8 posts in flight; 10 s per request.
    `retry_base`/`retry_cap` shape the backoff (seconds); `batch_size` is how many records the
    sender claims from the outbox at a time. `on_outcome(trace_id, outcome)` is called on the
    event loop when a post ends: "delivered", "retrying (<reason>)" or "dead-lettered".
    """

    def __init__(self, *, api_url: str, api_key: str | None, outbox_path: str | os.PathLike,
                 max_records: int = DEFAULT_MAX_RECORDS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_in_flight: int = 8, timeout: float = 10.0, ca_file: str | None = None,
                 status_interval: float | None = 30.0, retry_base: float = 0.5, retry_cap: float = 60.0,
                 batch_size: int = 64, on_outcome: Callable[[str, str], None] | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.api_url = api_url
        _check_api_url(api_url.strip())
        self.base_url, post_url, probe_url = traces_urls(api_url)
        self._post_url, self._probe_url = http1.URL(post_url), http1.URL(probe_url)  # parsed once
        self.shown_url = _safe_url(self.base_url)
        self.outbox_path = Path(outbox_path).expanduser()
        self.max_records, self.max_bytes = max_records, max_bytes
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.status_interval = status_interval
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.batch_size = max(batch_size, max_in_flight)
        # Static headers live on the client (encoded once, not per request).
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if api_key:
            self._headers["X_API_KEY"] = api_key
        self._ssl = _ssl_context(ca_file)
        self._outbox = Outbox(self.outbox_path, max_records=max_records, max_bytes=max_bytes)
        self._outbox.make_due()  # a new run: what waited for a later attempt is due now
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r4u-store")
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._sender: _Sender | None = None
        self._drainer: _Sender | None = None
        self._task: asyncio.Task | None = None
        self._wake_pending = False
        self._stopped = False
        self._reachable: bool | None = None
        self._last_error: str | None = None
        self._record_errors = 0
        self._internal_errors = 0
        self._poisoned_logged = 0
        self._misconfig_logged: set[int] = set()
        self._drops_unlogged = 0
        self._drop_logged_at = 0.0
        self._last_status: tuple | None = None
        self._on_outcome = on_outcome

    # The addon's side (any thread) ----------------------------------------------------------------

    def submit(self, make_record: Callable[[], dict], trace_id: str | None = None) -> None:
        """Build (`make_record()`) and store a record off the caller's thread; returns at once.
        After stop() it is done here and now instead, so that nothing is lost. `trace_id` names
        the trace in the log if building it fails."""
        if not self._stopped:
            try:
                self._executor.submit(self._store, make_record, True, trace_id)
                return
            except RuntimeError:  # shut down meanwhile
                pass
        self._store(make_record, False, trace_id)

    def start(self) -> None:
        """Start the sender task on the running event loop (call from inside it)."""
        if self._stopped:
            raise RuntimeError("this Delivery was stopped; make a new one")
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        sender = _Sender(self)
        self._sender = sender
        self._task = loop.create_task(sender.run(), name="r4u-sender")
        sender.main_task = self._task
        self._task.add_done_callback(self._sender_ended)
        self._wake_pending = False

    def flush(self) -> None:
        """Try now: every pending record is due, the backoff is reset."""
        if self._stopped:
            return

        def job() -> None:
            self._outbox.make_due()
            loop, sender = self._loop, self._sender
            if loop is not None and sender is not None:
                try:
                    loop.call_soon_threadsafe(sender.flush_now)
                except RuntimeError:
                    pass

        try:
            self._executor.submit(job)
        except RuntimeError:
            pass

    def status(self) -> dict:
        """What the delivery is doing (cheap; sync)."""
        try:
            stats = self._outbox.stats()
        except OutboxClosed:
            stats = read_stats(self.outbox_path)
        sender = self._drainer or self._sender
        return {
            "pending": stats["pending"],
            "delivered": stats["delivered"],
            "retried": stats["retried"],
            "dead_lettered": stats["dead_lettered"],
            "dropped": stats["dropped"],
            "record_errors": self._record_errors,
            "in_flight": sender.in_flight if sender is not None and not sender.closed else 0,
            "last_error": self._last_error,
            "reachable": self._reachable,
            "oldest_pending_age_s": stats["oldest_pending_age_s"],
            "outbox": str(self.outbox_path),
        }

    def stop(self, drain_seconds: float | None = None) -> None:
        """Sync. Store what is being built, stop the sender, then (if `drain_seconds` > 0) deliver
        what is pending within that deadline on a private loop in a thread; what is left stays
        in the outbox for the next run. Never takes much longer than the deadline."""
        if self._stopped:
            return
        self._stopped = True
        sender, loop = self._sender, self._loop
        leftover = None
        if sender is not None:
            leftover = sender.results.take(close=True)
            if loop is not None and self._loop_thread == threading.get_ident():
                try:
                    sender.cancel()
                except RuntimeError:  # the loop is closed already: nothing runs there any more
                    sender.closed = True
            elif loop is not None:
                sender.closed = True
                try:
                    loop.call_soon_threadsafe(sender.cancel)
                except RuntimeError:
                    pass
        self._executor.shutdown(wait=True)  # records being built reach the outbox
        try:
            if sender is not None:
                late = sender.results.take(close=True)
                for batch in (leftover, late):
                    if batch is not None:
                        self._outbox.settle(*batch)
            self._outbox.release()
            if drain_seconds and drain_seconds > 0 and self._outbox.pending_count():
                self._drain(drain_seconds)
            left = self._outbox.pending_count()
            if left:
                log.info("r4u-mitm: %d trace(s) stay in %s; they are delivered on the next start", left,
                         self.outbox_path)
        except Exception as exc:  # noqa: BLE001 - stopping must not raise into mitmproxy
            self._internal_error("stopping the delivery", exc)
        finally:
            self._log_drops(force=True)
            self._outbox.close()

    # The store thread -----------------------------------------------------------------------------

    def _store(self, make_record: Callable[[], dict], wake: bool, label: str | None = None) -> None:
        try:
            record = make_record()
            meta = record.get("metadata") if isinstance(record, dict) else None
            if not isinstance(record, dict):
                raise TypeError(f"the record is a {type(record).__name__}, not a dict")
            trace_id = meta.get("trace_id") if isinstance(meta, dict) else None
            if not isinstance(trace_id, str) or not trace_id:
                trace_id = str(uuid.uuid4())
        except Exception as exc:  # noqa: BLE001 - a broken record must not stop the others
            self._record_failed(f"building a trace record{f' (trace {label})' if label else ''}", exc)
            return
        try:
            try:
                dropped = self._outbox.put(trace_id, record)
            except OutboxClosed:  # after stop(): a short-lived connection of our own
                with Outbox(self.outbox_path, max_records=self.max_records, max_bytes=self.max_bytes) as outbox:
                    dropped = outbox.put(trace_id, record)
        except Exception as exc:  # noqa: BLE001
            self._record_failed(f"storing trace {trace_id} in {self.outbox_path}", exc)
            return
        if dropped:
            with self._lock:
                self._drops_unlogged += dropped
            self._log_drops()
        if wake:
            self._wake_sender()

    def _wake_sender(self) -> None:
        loop, sender = self._loop, self._sender
        if loop is None or sender is None or self._wake_pending:
            return
        self._wake_pending = True
        try:
            loop.call_soon_threadsafe(self._woken, sender)
        except RuntimeError:  # the loop is closed
            self._wake_pending = False

    def _woken(self, sender: _Sender) -> None:
        self._wake_pending = False
        sender.wake.fire()

    # Bookkeeping and logs -------------------------------------------------------------------------

    def _record_failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._record_errors += 1
            n = self._record_errors
        if n <= 10 or n % 1000 == 0:
            log.error("r4u-mitm: error %s (%d so far; this trace is lost): %s", what, n, _describe(exc, self.timeout),
                      exc_info=n <= 3)

    def _internal_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._internal_errors += 1
            n = self._internal_errors
        if n <= 10 or n % 1000 == 0:
            log.error("r4u-mitm: error %s: %s", what, _describe(exc, self.timeout), exc_info=n <= 3)

    def _note_error(self, error: str) -> None:
        self._last_error = error

    def _unreachable(self, error: str) -> None:
        self._last_error = error
        if self._reachable is not False:
            self._reachable = False
            hint = "; set r4u_ca_file to R4U's CA" if "CERTIFICATE_VERIFY_FAILED" in error else ""
            log.warning("r4u-mitm: R4U is not answering at %s (%s%s); traces are kept in %s until it answers",
                        self.shown_url, error, hint, self.outbox_path)

    def _answered(self) -> None:
        if self._reachable is False:
            log.info("r4u-mitm: R4U answers again at %s; delivering the traces kept in %s",
                     self.shown_url, self.outbox_path)
        self._reachable = True

    def _misconfigured(self, status: int, reason: str) -> None:
        if status in self._misconfig_logged:
            return
        self._misconfig_logged.add(status)
        hint = "check R4U_API_KEY" if status in (401, 403, 407) else "check r4u_api_url"
        log.warning("r4u-mitm: R4U at %s answers %s (%s); traces are kept in %s and tried again",
                    self.shown_url, reason, hint, self.outbox_path)

    def _poisoned(self, trace_id: str, reason: str) -> None:
        self._last_error = reason
        self._poisoned_logged += 1
        n = self._poisoned_logged
        if n <= 10 or n % 100 == 0:
            log.warning("r4u-mitm: R4U refused trace %s (%s); it was moved to the dead-letter table of %s "
                        "(%d so far this run)", trace_id, reason, self.outbox_path, n)

    def _log_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._drops_unlogged or (not force and now - self._drop_logged_at < DROP_LOG_EVERY
                                            and self._drop_logged_at):
                return
            n, self._drops_unlogged, self._drop_logged_at = self._drops_unlogged, 0, now
        log.warning("r4u-mitm: the outbox %s is full (%d traces / %d MB at most): dropped the %d oldest trace(s)",
                    self.outbox_path, self.max_records, self.max_bytes // (1024 * 1024), n)

    def _status_line(self, stats: dict, sender: _Sender) -> None:
        self._log_drops()
        age = stats["oldest_pending_age_s"] or 0.0
        now = (stats["delivered"], stats["retried"], stats["dead_lettered"], stats["dropped"], self._record_errors)
        changed = self._last_status is not None and now[1:] != self._last_status[1:]
        self._last_status = now
        wrong = (self._reachable is False or sender.failures > 0 or changed
                 or (stats["pending"] and age > (self.status_interval or 0)))
        if not wrong:
            return
        level = logging.WARNING if self._reachable is False else logging.INFO
        log.log(level, "r4u-mitm status: pending=%d delivered=%d retried=%d dead_lettered=%d dropped=%d "
                "record_errors=%d oldest=%.0fs R4U=%s last_error=%s",
                stats["pending"], stats["delivered"], stats["retried"], stats["dead_lettered"], stats["dropped"],
                self._record_errors, age,
                {True: "answering", False: "unreachable", None: "unknown"}[self._reachable], self._last_error)

    def _sender_ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._internal_error("in the sender task (delivery stopped; traces stay in the outbox)", exc)

    # Delivery's plumbing --------------------------------------------------------------------------

    def _make_client(self) -> http1.Client:
        # Direct connections only (never through the proxy, or any proxy, by env); no redirects.
        return http1.Client(ssl_context=self._ssl, timeout=self.timeout, headers=self._headers,
                            max_connections=self.max_in_flight, keepalive_expiry=30.0)

    def _drain(self, seconds: float) -> None:
        pending = self._outbox.pending_count()
        log.info("r4u-mitm: delivering %d pending trace(s) to %s before exit (at most %gs)", pending,
                 self.shown_url, seconds)
        self._outbox.make_due()
        errors: list[BaseException] = []

        async def drain() -> None:
            sender = _Sender(self, deadline=time.monotonic() + seconds)
            self._drainer = sender
            try:
                async with asyncio.timeout(seconds):
                    await sender.run()
            except TimeoutError:
                pass
            finally:
                sender.closed = True

        def run() -> None:
            try:
                asyncio.run(drain())
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=run, name="r4u-drain", daemon=True)
        thread.start()
        thread.join(seconds + 1.0)
        if thread.is_alive():
            log.warning("r4u-mitm: the final delivery did not end within %gs; leaving it", seconds)
        elif errors:
            self._internal_error("delivering before exit", errors[0])
        self._drainer = None
