"""What to do with R4U's answer to a post: deliver, retry later, or dead-letter. Pure: no I/O,
no clock of its own (callers pass `now` and the random draw), so a table test covers it.

* 2xx: delivered.
* R4U out of service (502, 503, 504), busy (408, 429), and answers that say R4U is set up
  wrong rather than the record (3xx, 401, 403, 404, 405, 407), 1xx: retried later without a cap
  (Retry-After honoured on 429/503), and the deliverer pauses so that a failing R4U is not
  hammered.
* Any other 5xx (500 above all): R4U answered but failed on this record (its parser crashed;
  it stored a raw row all the same). Retried `max_attempts` times at most, spread over minutes,
  without pausing the others; then dead-lettered with R4U's detail.
* Any other 4xx (422 above all): the record is refused; it is dead-lettered at once with the
  status and a short reason (never R4U's whole answer: a 422 echoes the input).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRY_AFTER_MAX = 600.0  # a Retry-After beyond 10 minutes is taken as 10 minutes
REASON_MAX = 200
ANSWER_READ = 4 * 1024 * 1024  # bytes of an answer read for its reason (R4U's 201 echoes the whole record)
RETRYABLE = frozenset({408, 429})
OUTAGE = frozenset({502, 503, 504})  # R4U (or a gateway in front of it) out of service: no cap
# Answers about R4U's setup (wrong URL, auth, a redirect), not about the record: keep the record.
NOT_THE_RECORD = frozenset({401, 403, 404, 405, 407})
# R4U failing on a record: its retries wait this many times the outage backoff (0.5 s → 15 s
# first, doubling; the cap 60 s → 10 min), so that `max_attempts` posts span minutes.
FAILURE_BASE_SCALE, FAILURE_CAP_SCALE = 30, 10
# The answer deadline: R4U has `timeout` seconds plus this many per byte of the record (1 s per
# MB: a slow link, a big record to parse), doubled on each retry of the record, up to 16 times.
SECONDS_PER_BYTE = 1 / (1024 * 1024)
DEADLINE_DOUBLINGS = 4


@dataclass(frozen=True, slots=True)
class Decision:
    action: str                     # "delivered", "retry" or "dead"
    delay: float = 0.0              # retry: seconds until the record is due again
    pause: float | None = None      # retry: the deliverer pauses this long (Retry-After), None: its backoff
    misconfigured: bool = False     # the answer is about R4U's setup: say so once
    failed: bool = False            # retry: R4U failed on this record; counts against max_attempts


def decide(status: int, attempts: int, failures: int, retry_after: str | None = None, *, max_attempts: int,
           now: float, draw: float, base: float = 0.5, cap: float = 60.0) -> Decision:
    """The decision for an answer `status` to a record tried `attempts` times before, `failures`
    of which R4U answered with a failure that counts against `max_attempts`."""
    if 200 <= status < 300:
        return Decision("delivered")
    if status >= 500 and status not in OUTAGE:
        if failures + 1 >= max_attempts:
            return Decision("dead")
        delay = backoff(failures + 1, draw, base * FAILURE_BASE_SCALE, cap * FAILURE_CAP_SCALE)
        return Decision("retry", delay, 0.0, failed=True)  # no pause: the others go on
    misconfigured = status in NOT_THE_RECORD or 300 <= status < 400
    if misconfigured or status in RETRYABLE or status in OUTAGE or status < 200:
        wait = parse_retry_after(retry_after, now) if status in (429, 503) else None
        delay = max(wait or 0.0, backoff(attempts + 1, draw, base, cap))
        return Decision("retry", delay, wait, misconfigured)
    return Decision("dead")


def backoff(n: int, draw: float, base: float = 0.5, cap: float = 60.0) -> float:
    """The n-th delay (n >= 1): exponential, capped, with jitter (half fixed, half `draw` in [0, 1))."""
    delay = min(cap, base * 2 ** min(max(n, 1) - 1, 30))
    return delay / 2 + draw * delay / 2


def answer_deadline(size: int, attempts: int, timeout: float) -> float:
    """Seconds R4U has to take a record of `size` bytes tried `attempts` times before and answer:
    `timeout` plus 1 s per MB, doubled on each retry, at most 16 times."""
    return (timeout + size * SECONDS_PER_BYTE) * 2 ** min(max(attempts, 0), DEADLINE_DOUBLINGS)


def parse_retry_after(value: str | None, now: float) -> float | None:
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
        seconds = when.timestamp() - now
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def rejection_reason(status: int, phrase: str, body: bytes) -> str:
    """A short reason for a refusal: FastAPI's first `detail` item's `loc` and `msg` (never its
    `input`, which echoes the record), or the detail string, or the status phrase."""
    text = ""
    try:
        data = json.loads(body) if len(body) <= ANSWER_READ else None
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
    text = " ".join(text.split()) or phrase
    return f"HTTP {status}: {text}"[:REASON_MAX]


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a failure (its type, its message, the OS reason)."""
    text = " ".join(str(exc).split())
    cause, seen = exc.__cause__ or exc.__context__, 0
    while cause is not None and seen < 5:  # e.g. "All connection attempts failed" ← ECONNREFUSED
        if isinstance(cause, OSError) and cause.errno:
            text = f"{text} ({os.strerror(cause.errno)})" if text else os.strerror(cause.errno)
            break
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return f"{type(exc).__name__}: {text}"[:REASON_MAX] if text else type(exc).__name__
