"""A fake R4U backend for the tests and the benchmark: strict, fast, and able to misbehave.

An asyncio HTTP/1.1 server (keep-alive, Content-Length bodies, hand-written parsing) running on
its own event loop in a background thread. It validates `POST /v1/http-traces` more strictly
than R4U does (types, UTC timestamps, completed_at >= started_at) and answers like FastAPI:
`201` with the stored trace, or `422` with a `detail` list that echoes the input. `GET /health`
answers `{"status":"ok"}`, as R4U's does; `GET /v1/traces` lists what it got.

    fake = FakeR4U().start()            # FakeR4U(tls=(cert, key)) serves https
    ... fake.url, fake.received, fake.posts, fake.seen, fake.wait_for(n)
    fake.fail_next(3, 503); fake.hang(2.0); fake.slow(1.0, lambda r: ...); fake.clear_faults()
    fake.reject(lambda r: ...); fake.reject(lambda r: ..., 500, "Internal error parsing HTTP trace: ...")
    fake.stop(); fake.start()          # down, then back on the same port

Manual demos: `python -m tests.fakes.r4u --port 8000` prints one line per record received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

TRACES_PATH = "/v1/http-traces"
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024

REQUIRED = ("started_at", "completed_at", "status_code", "request", "request_headers", "response",
            "response_headers")
OPTIONAL_STR = ("error", "path", "request_method", "request_path")


@dataclass
class Post:
    """One POST the fake saw (whatever its path), and what it answered."""

    method: str
    path: str
    headers: dict[str, str]          # names lower-cased
    status: int                      # 0: the client went away before an answer
    size: int
    trace_id: str | None = None
    at: float = field(default_factory=time.monotonic)


class FakeR4U:
    def __init__(self, port: int = 0, *, on_record: Callable[[dict, int], None] | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        self.port = port
        self.tls = tls                   # (cert file, key file): serve https
        self.on_record = on_record       # called (record, id) for each accepted record, in the fake's thread
        self.received: list[dict] = []   # accepted records, in arrival order
        self.posts: list[Post] = []
        self.seen: list[tuple[str, str]] = []  # (method, target) of every request, in arrival order
        self.requests = 0                # every request, any method
        self.in_flight = self.most_in_flight = 0  # requests read and not yet answered: now, at most
        self._lock = threading.Lock()
        self._fail: list[tuple[int, str | None]] = []
        self._hang_until: float | None = None   # monotonic; inf = until cleared
        self._slow = 0.0
        self._slow_only: Callable[[dict], bool] | None = None
        self._reject: Callable[[dict], bool] | None = None
        self._reject_with: tuple[int, str | None] = (422, None)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    # Control (any thread) -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> "FakeR4U":
        """Listen (again) on `port` (a free one the first time when it is 0)."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", self.port))
                self.port = sock.getsockname()[1]
                context = None
                if self.tls:
                    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                    context.load_cert_chain(*self.tls)
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, sock=sock, limit=MAX_HEAD, backlog=1024, ssl=context)
                )
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-r4u-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread = None
            raise RuntimeError(f"FakeR4U cannot listen on 127.0.0.1:{self.port}: {failure[0]}")
        return self

    def stop(self) -> None:
        """Stop listening and drop every connection: connections are refused until start()."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    def fail_next(self, n: int, status: int = 503, retry_after: int | float | str | None = None) -> None:
        """Answer the next `n` trace posts with `status` (a JSON body, and Retry-After if given)."""
        with self._lock:
            self._fail.extend([(status, None if retry_after is None else str(retry_after))] * n)

    def hang(self, seconds: float | None = None) -> None:
        """Hold every request that arrives in the next `seconds` (None: until cleared) without
        answering. A held request is answered normally when the hang ends, unless its client
        has gone by then (then it is dropped, unstored: the client saw a failure)."""
        with self._lock:
            self._hang_until = float("inf") if seconds is None else time.monotonic() + seconds

    def slow(self, seconds: float, only: Callable[[dict], bool] | None = None) -> None:
        """Answer every request `seconds` late (R4U busy but alive); with `only`, the posts of
        records matching it (a big record, a slow parse) and nothing else. A client gone by then
        got no answer: the post is dropped, unstored."""
        with self._lock:
            self._slow, self._slow_only = seconds, only

    def reject(self, predicate: Callable[[dict], bool], status: int = 422, detail: str | None = None) -> None:
        """Answer 422 (FastAPI-shaped, echoing the input) for valid records matching `predicate`;
        with another `status`, that status and `{"detail": detail}` (R4U's parser failing on a
        record: 500, "Internal error parsing HTTP trace: ...")."""
        with self._lock:
            self._reject, self._reject_with = predicate, (status, detail)

    def clear_faults(self) -> None:
        with self._lock:
            self._fail.clear()
            self._hang_until = None
            self._slow, self._slow_only = 0.0, None
            self._reject = None

    def reset(self) -> None:
        """Forget what was received (and the faults)."""
        self.clear_faults()
        with self._lock:
            self.received.clear()
            self.posts.clear()
            self.seen.clear()
            self.requests = 0

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        """Wait until `n` records were accepted; return them all (arrival order)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            if time.monotonic() > deadline:
                statuses: dict[int, int] = {}
                for post in list(self.posts):
                    statuses[post.status] = statuses.get(post.status, 0) + 1
                raise AssertionError(
                    f"FakeR4U accepted {len(self.received)} of {n} records within {timeout}s "
                    f"({'listening' if self.running else 'stopped'} on {self.url}; {len(self.posts)} posts seen, "
                    f"answered {statuses or 'nothing'}; faults: fail_next={len(self._fail)}, "
                    f"hang={self._hang_until is not None}, slow={self._slow}, reject={self._reject is not None})"
                )
            time.sleep(0.01)
        return list(self.received)

    def trace_ids(self) -> list[str | None]:
        return [_trace_id(r) for r in list(self.received)]

    # Server (the fake's thread) -------------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self._tasks:  # aborted connections end their tasks; cancel what still waits
            _, waiting = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in waiting:
                task.cancel()
        self._tasks.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._answer(writer, 431, {"detail": "Request Header Fields Too Large"}, close=True)
                    return
                try:
                    method, target, headers = _parse_head(head)
                except ValueError as exc:
                    await self._answer(writer, 400, {"detail": f"bad request: {exc}"}, close=True)
                    return
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self._answer(writer, 411, {"detail": "Length Required (the fake reads Content-Length only)"},
                                       close=True)
                    return
                try:
                    length = int(headers.get("content-length", "0"))
                    if not 0 <= length <= MAX_BODY:
                        raise ValueError
                except ValueError:
                    await self._answer(writer, 400, {"detail": "bad Content-Length"}, close=True)
                    return
                try:
                    body = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                self.seen.append((method, target))
                close = headers.get("connection", "").lower() == "close"
                self.in_flight += 1  # (this loop's thread alone changes it)
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                try:
                    if not await self._wait_faults(reader, self._delay(method, target, body)):
                        if method == "POST":
                            self._note_post(method, target, headers, 0, len(body), _trace_id(_json_or_none(body)))
                        return  # the client gave up while the request was held
                    try:
                        status, payload, extra = self._handle(method, target, headers, body)
                    except Exception as exc:  # noqa: BLE001 - a bug of the fake: say it, loudly
                        status, payload, extra = 500, {"detail": f"fake R4U bug: {exc!r}"}, None
                    await self._answer(writer, status, payload, extra, close=close)
                finally:
                    self.in_flight -= 1
                if close:
                    return
        except asyncio.CancelledError:  # the fake stops: end quietly
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            try:
                writer.close()
            except RuntimeError:
                pass

    def _delay(self, method: str, target: str, body: bytes) -> float:
        """How late to answer this request (`slow`)."""
        with self._lock:
            seconds, only = self._slow, self._slow_only
        if not seconds or only is None:
            return seconds
        if method != "POST" or urlsplit(target).path != TRACES_PATH:
            return 0.0
        try:
            record = json.loads(body)
        except ValueError:
            return 0.0
        return seconds if isinstance(record, dict) and only(record) else 0.0

    async def _wait_faults(self, reader: asyncio.StreamReader, delay: float) -> bool:
        """Hold the request while a hang is on, then wait `delay`. False: client is gone."""
        while True:
            until = self._hang_until
            if until is None or time.monotonic() >= until:
                break
            if reader.at_eof():
                return False
            await asyncio.sleep(0.01)
        if delay:
            await asyncio.sleep(delay)
            if reader.at_eof():
                return False
        return True

    async def _answer(self, writer: asyncio.StreamWriter, status: int, payload: object,
                      extra: dict[str, str] | None = None, close: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(data)}",
                 f"date: {formatdate(usegmt=True)}", "server: fake-r4u"]
        if close:
            lines.append("connection: close")
        for name, value in (extra or {}).items():
            lines.append(f"{name}: {value}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
        try:
            await writer.drain()
        except ConnectionError:
            pass

    def _note_post(self, method: str, target: str, headers: dict[str, str], status: int, size: int,
                   trace_id: str | None) -> None:
        self.posts.append(Post(method, target, headers, status, size, trace_id))

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes
                ) -> tuple[int, object, dict[str, str] | None]:
        url = urlsplit(target)
        if method == "POST":
            status, payload, extra, trace_id = self._post(url.path, body)
            self._note_post(method, target, headers, status, len(body), trace_id)
            return status, payload, extra
        if method == "GET" and url.path == "/health":
            return 200, {"status": "ok"}, None
        if method == "GET" and url.path == "/v1/traces":
            return self._list(url.query)
        if method == "GET" and url.path.startswith("/v1/traces/") and url.path.endswith("/http-trace"):
            try:
                n = int(url.path.split("/")[3])
                if n < 1:
                    raise IndexError(n)
                return 200, {"id": n, **self.received[n - 1]}, None
            except (ValueError, IndexError):
                return 404, {"detail": "Trace not found"}, None
        return 404, {"detail": "Not Found"}, None

    def _post(self, path: str, body: bytes) -> tuple[int, object, dict[str, str] | None, str | None]:
        if path != TRACES_PATH:
            return 404, {"detail": "Not Found"}, None, None
        with self._lock:
            fault = self._fail.pop(0) if self._fail else None
            reject, (reject_status, reject_detail) = self._reject, self._reject_with
        try:
            record = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            record, problem = None, exc
        else:
            problem = None
        trace_id = _trace_id(record)
        if fault is not None:
            status, retry_after = fault
            phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
            extra = {"retry-after": retry_after} if retry_after is not None else None
            return status, {"detail": f"{phrase} (fake)"}, extra, trace_id
        if problem is not None:
            detail = [{"type": "json_invalid", "loc": ["body", getattr(problem, "pos", 0)], "msg": "JSON decode error",
                       "input": {}, "ctx": {"error": str(problem).split(":")[0]}}]
            return 422, {"detail": detail}, None, None
        errors = validate(record)
        if not errors and reject is not None and reject(record):
            if reject_status != 422:
                return reject_status, {"detail": reject_detail}, None, trace_id
            errors = [{"type": "value_error", "loc": ["body"], "msg": "Value error, rejected by the fake",
                       "input": record, "ctx": {"error": {}}}]
        if errors:
            return 422, {"detail": errors}, None, trace_id
        with self._lock:
            self.received.append(record)
            n = len(self.received)
        if self.on_record is not None:
            self.on_record(record, n)
        return 201, {"id": n, **record}, None, trace_id

    def _list(self, query: str) -> tuple[int, object, None]:
        params = parse_qs(query)
        try:
            limit = int(params.get("limit", ["100"])[0])
            offset = int(params.get("offset", ["0"])[0])
            if limit < 0 or offset < 0:
                raise ValueError
        except ValueError:
            return 422, {"detail": [{"type": "int_parsing", "loc": ["query", "limit"],
                                     "msg": "Input should be a valid integer", "input": query}]}, None
        records = list(enumerate(self.received, 1))[::-1][offset:offset + limit]
        out = [{
            "id": n,
            "started_at": r["started_at"],
            "completed_at": r["completed_at"],
            "status_code": r["status_code"],
            "request_method": r.get("request_method"),
            "request_path": r.get("request_path"),
            "error": r.get("error"),
            "trace_id": _trace_id(r),
        } for n, r in records]
        return 200, out, None


# Validation, FastAPI-shaped -----------------------------------------------------------------------

def validate(record: object) -> list[dict]:
    """What R4U's request model would say about `record` (stricter on purpose), as FastAPI's
    `detail` list; empty when valid. Unknown fields are ignored."""
    if not isinstance(record, dict):
        return [_err("model_attributes_type", ("body",),
                     "Input should be a valid dictionary or object to extract fields from", record)]
    errors = []
    for name in REQUIRED:
        if name not in record:
            errors.append(_err("missing", ("body", name), "Field required", record))
    times = {}
    for name in ("started_at", "completed_at"):
        if name in record:
            value, problem = _utc_datetime(record[name])
            if problem:
                errors.append(_err(problem[0], ("body", name), problem[1], record[name]))
            else:
                times[name] = value
    if len(times) == 2 and times["completed_at"] < times["started_at"]:
        errors.append(_err("value_error", ("body", "completed_at"),
                           "Value error, completed_at is before started_at", record["completed_at"]))
    if "status_code" in record:
        value = record["status_code"]
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(_err("int_type", ("body", "status_code"), "Input should be a valid integer", value))
    for name in ("request", "response"):
        if name in record and not isinstance(record[name], str):
            errors.append(_err("string_type", ("body", name), "Input should be a valid string", record[name]))
    for name in ("request_headers", "response_headers"):
        if name not in record:
            continue
        value = record[name]
        if not isinstance(value, dict):
            errors.append(_err("dict_type", ("body", name), "Input should be a valid dictionary", value))
            continue
        for key, item in value.items():
            if not isinstance(item, str):
                errors.append(_err("string_type", ("body", name, key), "Input should be a valid string", item))
    for name in OPTIONAL_STR:
        if name in record and record[name] is not None and not isinstance(record[name], str):
            errors.append(_err("string_type", ("body", name), "Input should be a valid string", record[name]))
    if "metadata" in record and not isinstance(record["metadata"], dict):
        errors.append(_err("dict_type", ("body", "metadata"), "Input should be a valid dictionary",
                           record["metadata"]))
    return errors


def _utc_datetime(value: object) -> tuple[datetime | None, tuple[str, str] | None]:
    if not isinstance(value, str):
        return None, ("datetime_type", "Input should be a valid datetime")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None, ("datetime_from_date_parsing", "Input should be a valid datetime or date, invalid format")
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        return None, ("timezone_aware", "Input should have timezone info (send UTC: +00:00 or Z)")
    if parsed.utcoffset() != timedelta(0):
        return None, ("value_error", "Value error, timestamps must be in UTC (+00:00 or Z)")
    return parsed, None


def _err(kind: str, loc: tuple, msg: str, value: object) -> dict:
    return {"type": kind, "loc": list(loc), "msg": msg, "input": value}


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _trace_id(record: object) -> str | None:
    meta = record.get("metadata") if isinstance(record, dict) else None
    trace_id = meta.get("trace_id") if isinstance(meta, dict) else None
    return trace_id if isinstance(trace_id, str) else None


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("not an HTTP/1.x request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("malformed header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


# Manual demos -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.r4u", description="A fake R4U for demos.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quiet", action="store_true", help="no line per record (benchmarks)")
    opts = parser.parse_args(argv)

    def show(record: dict, n: int) -> None:
        print(f"#{n} {record.get('request_method')} {record.get('request_path')} {record.get('status_code')} "
              f"{_trace_id(record)}", flush=True)

    fake = FakeR4U(opts.port, on_record=None if opts.quiet else show)
    fake.start()
    print(f"fake R4U listening on {fake.url} (POST {TRACES_PATH}, GET /v1/traces, GET /health)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    fake.stop()
    print(f"received {len(fake.received)} records ({len(fake.posts)} posts)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
