"""The spool: raw exchanges waiting for the deliverer, in one SQLite file (WAL), plus the
dead-letter table, the trace ids already accepted, the delivery counters and the deliverer's
own state. Knows nothing of HTTP or mitmproxy flows.

The proxy appends each finished exchange as it was on the wire (`pack`: a small JSON head, the
bodies and the piece times as BLOBs; no decoding, no parsing); the deliverer claims due rows,
builds the records (`unpack` then `record.build_record`) and settles them: delivered rows are
deleted, refused ones move to the dead-letter table as they are (raw: a later version can rebuild
them; `requeue_dead` puts them back), the rest are tried again later, counting the attempts and,
apart, R4U's failures on the record (which the deliverer caps). A trace id is accepted once (`seen`): a proxy and a
backfill of its flows never post one record twice. Bounded: beyond `max_records` rows or
`max_bytes`, the oldest are dropped, counted and reported to the caller (who logs it).

Rows survive a crash or `kill -9` of either process (WAL, synchronous=NORMAL: only a power loss
may lose the last few commits). The file and its -wal/-shm companions are private to the user
(mode 0600): they hold prompts and answers. Claims are kept in memory by the one deliverer that
holds the spool's lock: a new deliverer starts with none, so whatever an earlier one left (even
one killed mid-post) is delivered again.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate, islice
from pathlib import Path
from typing import NamedTuple

from r4u_mitm.pure.record import Exchange, Pieces
from r4u_mitm.pure.redact import body_redactor, redact_pairs, redact_raw, redact_url

__all__ = ["Spool", "SpoolBusy", "SpoolClosed", "SpoolError", "Packed", "UnjoinedBody", "pack", "unpack", "read_stats",
           "read_dead_letters", "DEFAULT_MAX_RECORDS", "DEFAULT_MAX_BYTES"]

# Sized for a day of heavy use on a laptop: ~100k exchanges, ~10 KB each on average, with
# room for some large streams, before anything is dropped.
DEFAULT_MAX_RECORDS = 100_000
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024  # 1 GiB

SCHEMA_VERSION = 3
REASON_MAX = 200
ERROR_MAX = 200
SEEN_MAX = 100_000  # trace ids remembered (the most recent)
BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another connection's transaction
COUNTERS = ("delivered", "retried", "dead_lettered", "dropped")
# Running totals kept by triggers, so bounds and stats are O(1) and exact for every connection.
TOTALS = ("pending", "pending_bytes", "dead_letter", "dead_letter_bytes", "seen")
# What an append checks its bounds with, in one statement (each statement is a round trip for
# the GIL, which the proxy's writer shares with the event loop)
_BOUNDS_NOW = ("SELECT (SELECT value FROM counters WHERE name = 'pending'), "
               "(SELECT value FROM counters WHERE name = 'pending_bytes'), "
               "(SELECT value FROM counters WHERE name = 'seen')")
# Give the freed pages back to the file system when the spool empties and this much is free.
VACUUM_FREE_BYTES = 64 * 1024 * 1024
RAW = "head, request_body, response_body, piece_ends, piece_times"
_BLOBS = ("request_body", "response_body", "piece_ends", "piece_times")  # the last columns with data
SLICE = 1024 * 1024  # bytes of a big exchange written at a time (the GIL is free meanwhile)
PIECES_STEP = 4096  # pieces whose ends and times are listed at a time (well under a millisecond)
DEAD_COLUMNS = "trace_id, status, reason, failed_at, attempts"
RECORD_HEAD = b'{"record":true}'  # a finished record (from a version 1 outbox): posted as it is
BIG_BODY = 1024 * 1024  # bytes of a body from which a claim reads it apart, with blob I/O
_BIG_BODIES = ((5, "request_body"), (6, "response_body"))  # their places in a claimed row


def _claimed_columns(big: int) -> str:
    """RAW, with a body of more than `big` bytes as NULL (the columns are NOT NULL), to be read
    apart (`_read_big_bodies`). length() of a blob reads its size only."""
    bodies = ", ".join(f"CASE WHEN length({column}) > {big} THEN NULL ELSE {column} END" for _, column in _BIG_BODIES)
    return f"head, {bodies}, piece_ends, piece_times"


_CLAIMED = _claimed_columns(BIG_BODY)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id      TEXT    NOT NULL,
    created       REAL    NOT NULL,
    next_attempt  REAL    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    size          INTEGER NOT NULL,
    head          BLOB    NOT NULL,
    request_body  BLOB    NOT NULL,
    response_body BLOB    NOT NULL,
    piece_ends    BLOB    NOT NULL,
    piece_times   BLOB    NOT NULL,
    failures      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS exchanges_due ON exchanges (next_attempt, id);
CREATE TABLE IF NOT EXISTS dead_letter (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id      TEXT    NOT NULL,
    created       REAL    NOT NULL,
    failed_at     REAL    NOT NULL,
    status        INTEGER,
    reason        TEXT,
    attempts      INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    head          BLOB    NOT NULL,
    request_body  BLOB    NOT NULL,
    response_body BLOB    NOT NULL,
    piece_ends    BLOB    NOT NULL,
    piece_times   BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (trace_id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS exchange_added AFTER INSERT ON exchanges BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'pending';
    UPDATE counters SET value = value + NEW.size WHERE name = 'pending_bytes';
END;
CREATE TRIGGER IF NOT EXISTS exchange_removed AFTER DELETE ON exchanges BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'pending';
    UPDATE counters SET value = value - OLD.size WHERE name = 'pending_bytes';
END;
CREATE TRIGGER IF NOT EXISTS dead_letter_added AFTER INSERT ON dead_letter BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'dead_letter';
    UPDATE counters SET value = value + NEW.size WHERE name = 'dead_letter_bytes';
END;
CREATE TRIGGER IF NOT EXISTS dead_letter_removed AFTER DELETE ON dead_letter BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'dead_letter';
    UPDATE counters SET value = value - OLD.size WHERE name = 'dead_letter_bytes';
END;
CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'seen';
END;
CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'seen';
END;
"""

# A version 1 file (the outbox of records): its pending records and dead letters are kept as
# finished records, posted as they are.
_FROM_V1 = f"""
DROP TRIGGER IF EXISTS pending_added;
DROP TRIGGER IF EXISTS pending_removed;
DROP TRIGGER IF EXISTS dead_letter_added;
DROP TRIGGER IF EXISTS dead_letter_removed;
ALTER TABLE dead_letter RENAME TO dead_letter_v1;
{_SCHEMA}
INSERT INTO exchanges (trace_id, created, next_attempt, attempts, last_error, size, {RAW})
    SELECT trace_id, created, next_attempt, attempts, last_error, size, X'{RECORD_HEAD.hex()}', X'', body, X'', X''
    FROM pending ORDER BY id;
INSERT INTO dead_letter (trace_id, created, failed_at, status, reason, attempts, size, {RAW})
    SELECT trace_id, created, failed_at, status, reason, attempts, size, X'{RECORD_HEAD.hex()}', X'', body, X'', X''
    FROM dead_letter_v1 ORDER BY id;
DROP TABLE pending;
DROP TABLE dead_letter_v1;
"""
# A version 2 file: the count of R4U's failures on each exchange (see `settle`'s `failed`).
_FROM_V2 = "ALTER TABLE exchanges ADD COLUMN failures INTEGER NOT NULL DEFAULT 0"


class SpoolError(RuntimeError):
    """The spool file cannot be opened or used (not SQLite, no permission, a newer schema, a full disk...)."""


class SpoolClosed(RuntimeError):
    """The spool was closed; open a new one on the same file."""


class SpoolBusy(RuntimeError):
    """Another connection is writing to the spool (raised instead of waiting, when asked to)."""


class Packed(NamedTuple):
    """One exchange as the spool stores it."""

    trace_id: str
    head: bytes
    request_body: bytes
    response_body: bytes | UnjoinedBody  # UnjoinedBody: see `pack`'s `joined`
    piece_ends: bytes
    piece_times: bytes

    @property
    def size(self) -> int:
        return (len(self.head) + len(self.request_body) + len(self.response_body) + len(self.piece_ends)
                + len(self.piece_times))


class Row(NamedTuple):
    """A claimed exchange."""

    id: int
    trace_id: str
    attempts: int
    failures: int   # attempts R4U answered with a failure that counts against the cap (a 500)
    head: bytes
    request_body: bytes
    response_body: bytes
    piece_ends: bytes
    piece_times: bytes

    @property
    def size(self) -> int:
        return sum(map(len, self[4:]))  # the exchange's columns, as `Packed.size` counts them


_BODY_FIELDS = frozenset({"pieces", "piece_times", "request_body"})
_HEAD_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False).encode  # plain data


class UnjoinedBody:
    """A body as the pieces it came in, not joined: `len()` is its size in bytes, a slice `[a:b]`
    the bytes between (joined from the pieces that hold them), `bytes()` all of it. The proxy's
    writer stores a big stream this way, a slice at a time (see `pack` and `Spool.append`): never
    a copy of the whole body, nor the GIL held while one is made."""

    __slots__ = ("pieces", "ends")

    def __init__(self, pieces: Sequence[bytes], ends: Sequence[int]) -> None:
        self.pieces, self.ends = pieces, ends  # ends: where each piece ends in the body

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def __getitem__(self, where: slice) -> bytes:
        start, stop, _ = where.indices(len(self))
        if start >= stop:
            return b""
        first, last = bisect_right(self.ends, start), bisect_left(self.ends, stop)
        offset = self.ends[first - 1] if first else 0
        return b"".join(self.pieces[first:last + 1])[start - offset:stop - offset]


def pack(ex: Exchange, options: dict, *, joined: bool = True) -> Packed:
    """`ex` and the options its record is built with (the proxy's: max_body_bytes, redaction),
    as the spool stores them: no parsing unless the redactor's cheap pre-check finds a
    secret-looking key. Secrets are redacted before anything reaches the disk. `joined=False`
    (the proxy's writer): a response body bigger than a slice that needs no redaction stays in
    its pieces (`UnjoinedBody`), for `Spool.append` to write a slice at a time. A long stream is
    walked in steps, other threads (the event loop) having the GIL in between."""
    head = {name: getattr(ex, name) for name in Exchange.__slots__ if name not in _BODY_FIELDS}
    # No secret on disk: headers and URL redacted here as in the record; bodies too when they are
    # not content-encoded (a compressed body is stored as it came: the deliverer redacts it).
    extra = frozenset(name.lower() for name in options.get("redact", ()))
    head.update(url=redact_url(ex.url), request_headers=redact_pairs(ex.request_headers, extra),
                response_headers=redact_pairs(ex.response_headers, extra), options=options)
    redactor = body_redactor(options.get("redact_body_keys", ()), ex.path)
    request = bytes(ex.request_body or b"")
    if request and _identity(ex.request_headers):
        request = redact_raw(request, [len(request)], stream=False, redactor=redactor)[0]
    pieces, times = ex.pieces, ex.piece_times
    keep_times = len(times) == len(pieces)
    ends, piece_times = array("Q"), array("d")
    for at in _steps(len(pieces), PIECES_STEP):
        ends.extend(islice(accumulate(map(len, pieces[at:at + PIECES_STEP]), initial=ends[-1] if ends else 0), 1, None))
        if keep_times:
            piece_times.extend(times[at:at + PIECES_STEP])
    big = len(pieces) > 1 and ends[-1] > SLICE
    response = b"".join(pieces) if joined or not big else UnjoinedBody(pieces, ends)  # (one piece: no copy)
    if response and _identity(ex.response_headers):
        response, ends = redact_raw(response, ends, stream=ex.stream, redactor=redactor)
    # ASCII JSON: header values may hold lone surrogates (mitmproxy's escapes), kept exactly
    ends = ends if isinstance(ends, array) else array("Q", ends)
    return Packed(ex.trace_id, _HEAD_JSON(head).encode("ascii"), request, response, ends.tobytes(),
                  piece_times.tobytes())


def _steps(n: int, step: int) -> Iterator[int]:
    """range(0, n, step), the GIL left to other threads (the proxy's event loop) between steps."""
    for at in range(0, n, step):
        if at:
            time.sleep(0)
        yield at


def _identity(headers: list[tuple[str, str]]) -> bool:
    """No Content-Encoding (or identity): the body's bytes are its text."""
    return all(value.strip().lower() in ("", "identity") for name, value in headers
               if name.lower() == "content-encoding")


def unpack(row: Row | Packed) -> tuple[Exchange | None, dict]:
    """(exchange, build options), or (None, {}) for a finished record (posted as it is: the
    response_body). The exchange's pieces are the stored body and their ends in it (`Pieces`), its
    piece times an array('d') as stored (a list of 100k floats would be 3 MB more)."""
    head = json.loads(row.head)
    if head.get("record"):
        return None, {}
    options = head.pop("options", None) or {}
    ends = array("Q")
    ends.frombytes(row.piece_ends)
    times = array("d")
    times.frombytes(row.piece_times)
    body = row.response_body
    if len(ends) <= 1:  # the whole body, or no piece when it is empty
        ends = array("Q", [len(body)] if body else [])
    head["request_headers"] = [tuple(pair) for pair in head["request_headers"]]
    head["response_headers"] = [tuple(pair) for pair in head["response_headers"]]
    ex = Exchange(**head, request_body=row.request_body, pieces=Pieces(body, ends), piece_times=times)
    return ex, options


class Spool:
    """Raw exchanges, dead letters, seen trace ids, counters and state in the SQLite file `path`.

    Bounds: `max_records` pending exchanges and `max_bytes` of them (defaults: 100,000 and 1 GiB).
    An `append` that goes beyond either drops the oldest (never one that is claimed, i.e. being
    posted) and says how many. The dead-letter table keeps the most recent
    `max(100, max_records // 10)` rows and at most `max_bytes // 10` bytes.
    """

    def __init__(self, path: str | os.PathLike, *, max_records: int = DEFAULT_MAX_RECORDS,
                 max_bytes: int = DEFAULT_MAX_BYTES, checkpoint_pages: int | None = None) -> None:
        if max_records <= 0 or max_bytes <= 0:
            raise ValueError("max_records and max_bytes must be positive")
        self.path = Path(path).expanduser()
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_dead = max(100, max_records // 10)
        self.max_dead_bytes = max(1, max_bytes // 10)
        self._lock = threading.Lock()
        self._claimed: set[int] = set()
        existed = self.path.exists()
        try:
            _create_private(self.path)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except OSError as exc:
            raise SpoolError(f"cannot {'open' if existed else 'create'} {self.path}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open {self.path}: {exc}") from exc
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Someone else's database is left as it is (before any PRAGMA below changes it);
            # one statement, one snapshot: another process may be creating our schema right now.
            if db.execute("SELECT (SELECT user_version FROM pragma_user_version) = 0 "
                          "AND EXISTS (SELECT 1 FROM sqlite_master)").fetchone()[0]:
                raise SpoolError(f"{self.path} is not an r4u-mitm outbox (a SQLite database of something else)")
            # auto_vacuum only takes on a new file, before any table: it lets the file shrink.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL on {self.path} (journal_mode={mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            if checkpoint_pages is not None:  # (SQLite's default: 1000 pages of log, ~4 MB)
                db.execute(f"PRAGMA wal_autocheckpoint = {int(checkpoint_pages)}")
            with _transaction(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise SpoolError(f"{self.path} was written by a newer r4u-mitm (schema {version})")
                for statement in _statements(_FROM_V1 if version == 1 else _SCHEMA):
                    db.execute(statement)
                if version == 2:
                    db.execute(_FROM_V2)
                db.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
                               [(name,) for name in COUNTERS + TOTALS])
                if version == 1:  # the totals of the tables just filled
                    for table, count, size in (("exchanges", "pending", "pending_bytes"),
                                               ("dead_letter", "dead_letter", "dead_letter_bytes")):
                        n, total = db.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM {table}").fetchone()
                        db.execute("UPDATE counters SET value = ? WHERE name = ?", (n, count))
                        db.execute("UPDATE counters SET value = ? WHERE name = ?", (total, size))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise SpoolError(f"{self.path} is not an r4u-mitm outbox (not a SQLite database)") from exc
            raise SpoolError(f"cannot use {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db: sqlite3.Connection | None = db
        _tighten(self.path)

    # Writing ------------------------------------------------------------------------------------

    def append(self, items: Sequence[Packed]) -> tuple[int, int, int]:
        """Store `items` as pending and due now, in one transaction, skipping any whose trace id
        was accepted before. Returns (added, skipped as already seen, oldest dropped to stay
        within the bounds)."""
        now = time.time()
        added = skipped = 0
        with self._lock:
            db = self._conn()
            try:
                with _transaction(db):
                    for item in items:
                        if not db.execute("INSERT OR IGNORE INTO seen (trace_id, at) VALUES (?, ?)",
                                          (item.trace_id, now)).rowcount:
                            skipped += 1
                            continue
                        _insert(db, item, now)
                        added += 1
                    count, size, seen = db.execute(_BOUNDS_NOW).fetchone()
                    dropped = self._trim(db, count, size)
                    if dropped:
                        _bump(db, "dropped", dropped)
                    extra = seen - SEEN_MAX
                    if extra > 0:
                        db.execute("DELETE FROM seen WHERE trace_id IN (SELECT trace_id FROM seen ORDER BY at LIMIT ?)",
                                   (extra,))
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to the outbox {self.path}: {exc}") from exc
        return added, skipped, dropped

    def claim(self, limit: int, now: float | None = None) -> list[Row]:
        """Up to `limit` due exchanges (`next_attempt <= now`), the longest-waiting first. They
        are not handed out again until settled or released."""
        return self.take([rowid for rowid, _ in self.due(limit, now)])

    def due(self, limit: int, now: float | None = None) -> list[tuple[int, int]]:
        """(rowid, size) of up to `limit` unclaimed due exchanges, the longest-waiting first: what
        `claim` would take, without reading the exchanges (the caller sees how big they are)."""
        now = time.time() if now is None else now
        with self._lock:
            # One row for all (group_concat): each row fetched is a GIL round trip, which is
            # slow when the event loop's thread is busy. Both lists come from one scan, in its order.
            ids, sizes = self._conn().execute(
                "SELECT group_concat(id), group_concat(size) FROM (SELECT id, size FROM exchanges "
                "WHERE next_attempt <= ? ORDER BY next_attempt, id LIMIT ?)",
                (now, limit + len(self._claimed)),
            ).fetchone()
            if not ids:
                return []
            return [(rowid, size) for rowid, size in zip(map(int, ids.split(",")), map(int, sizes.split(",")))
                    if rowid not in self._claimed][:limit]

    def take(self, rowids: Sequence[int]) -> list[Row]:
        """Claim these exchanges (from `due`): those still pending and unclaimed, in that order."""
        with self._lock:
            ids = [rowid for rowid in rowids if rowid not in self._claimed]
            if not ids:
                return []
            db = self._conn()
            rows = {row[0]: row for row in db.execute(
                f"SELECT id, trace_id, attempts, failures, {_CLAIMED} FROM exchanges WHERE id IN ({_marks(len(ids))})",
                ids)}
            out = []
            for rowid in ids:
                row = rows.get(rowid)
                if row is not None and None in row:
                    row = _read_big_bodies(db, row)
                if row is not None:
                    out.append(Row(*row))
            self._claimed.update(row[0] for row in out)
            return out

    def settle(self, delivered: Iterable[int] = (),
               retry: Iterable[tuple[int, float, str]] = (),
               dead: Iterable[tuple[int, int | None, str]] = (),
               failed: Iterable[tuple[int, float, str]] = (), *, wait: bool = True) -> None:
        """Record what became of claimed records, in one transaction:
        `delivered` rowids are deleted (counted in `delivered`); `retry` items
        `(rowid, next_attempt, error)` are tried again from `next_attempt` (wall clock; attempts+1,
        counted in `retried`); `failed` items, the same, are records R4U failed on (failures+1
        too: the deliverer caps those); `dead` items `(rowid, http_status, reason)` move to the
        dead-letter table (counted in `dead_lettered`). The rowids are no longer claimed
        afterwards, even if this fails (then they are simply delivered again later).
        Not `wait`: SpoolBusy at once, nothing changed, when another connection is writing."""
        delivered, retry, dead, failed = list(delivered), list(retry), list(dead), list(failed)
        touched = set(delivered) | {r[0] for r in retry} | {d[0] for d in dead} | {f[0] for f in failed}
        if not touched:
            return
        now = time.time()
        with self._lock:
            busy = False
            try:
                db = self._conn()
                if not wait:
                    try:
                        _begin_now(db)
                    except SpoolBusy:
                        busy = True  # nothing changed: they stay claimed, for a settle that waits
                        raise
                with _transaction(db, begun=not wait):
                    if delivered:
                        for chunk in _chunks(delivered):  # one statement per chunk, not per row
                            db.execute(f"DELETE FROM exchanges WHERE id IN ({_marks(len(chunk))})", chunk)
                        _bump(db, "delivered", len(delivered))
                    for items, failure in ((retry, 0), (failed, 1)):
                        if items:
                            db.executemany(
                                "UPDATE exchanges SET attempts = attempts + 1, failures = failures + ?, "
                                "next_attempt = ?, last_error = ? WHERE id = ?",
                                [(failure, at, (error or "")[:ERROR_MAX], rowid) for rowid, at, error in items],
                            )
                            _bump(db, "retried", len(items))
                    if dead:
                        for rowid, status, reason in dead:
                            db.execute(
                                "INSERT INTO dead_letter (trace_id, created, failed_at, status, reason, attempts, size, "
                                f"{RAW}) SELECT trace_id, created, ?, ?, ?, attempts + 1, size, {RAW} FROM exchanges "
                                "WHERE id = ?",
                                (now, status, (reason or "")[:REASON_MAX], rowid),
                            )
                            db.execute("DELETE FROM exchanges WHERE id = ?", (rowid,))
                        _bump(db, "dead_lettered", len(dead))
                        self._trim_dead(db)
                self._maybe_vacuum(db)
            finally:
                if not busy:
                    self._claimed.difference_update(touched)

    def release(self, rowids: Iterable[int] | None = None) -> None:
        """Forget claims (all of them when `rowids` is None): those records can be claimed again."""
        with self._lock:
            if rowids is None:
                self._claimed.clear()
            else:
                self._claimed.difference_update(rowids)

    def make_due(self) -> int:
        """Make every pending record due now (a restart or a flush: R4U may be fine again).
        Returns how many were waiting for a later attempt."""
        with self._lock:
            db = self._conn()
            with _transaction(db):
                return db.execute("UPDATE exchanges SET next_attempt = created WHERE next_attempt > ?",
                                  (time.time(),)).rowcount

    # Reading ------------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When (wall clock) the next unclaimed pending record is due, or None when none is pending."""
        with self._lock:
            db = self._conn()
            limit = 1 + len(self._claimed)
            for rowid, at in db.execute("SELECT id, next_attempt FROM exchanges ORDER BY next_attempt, id LIMIT ?", (limit,)):
                if rowid not in self._claimed:
                    return at
            return None

    def stats(self) -> dict:
        """Counts and counters (cheap: the totals are kept by triggers)."""
        with self._lock:
            out = _stats(self._conn(), self.path)
            out["claimed"] = len(self._claimed)
            return out

    def set_state(self, values: dict) -> None:
        """What the deliverer says about itself (JSON values), for `r4u-mitm status` and r4u.status."""
        with self._lock:
            db = self._conn()
            with _transaction(db):
                db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                               [(k, json.dumps(v)) for k, v in values.items()])

    def pending_of(self, trace_ids: Sequence[str]) -> int:
        """How many of `trace_ids` are still pending (neither delivered, dead-lettered nor dropped)."""
        with self._lock:
            db = self._conn()
            return sum(db.execute(f"SELECT count(*) FROM exchanges WHERE trace_id IN ({_marks(len(chunk))})",
                                  chunk).fetchone()[0] for chunk in _chunks(list(trace_ids)))

    def pending_count(self) -> int:
        with self._lock:
            return _counter(self._conn(), "pending")

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The most recent dead letters (newest first), bodies included, for inspection."""
        with self._lock:
            rows = self._conn().execute(
                f"SELECT {DEAD_COLUMNS}, {RAW} FROM dead_letter ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [_dead_letter(row) for row in rows]

    def requeue_dead(self, reason: str | None = None) -> int:
        """Move the dead letters whose reason contains `reason` (ignoring case; all when None)
        back among the pending exchanges, raw as they were kept, due now, their attempts reset
        (R4U was upgraded, or what refused them fixed). Returns how many. No bound is applied
        here (dead letters are a tenth of the bounds at most): the next append trims."""
        with self._lock:
            db = self._conn()
            try:
                with _transaction(db):
                    ids = [rowid for rowid, text in db.execute("SELECT id, reason FROM dead_letter ORDER BY id")
                           .fetchall() if _matches(text, reason)]
                    for chunk in _chunks(ids):  # due since they were made: claimed in their first order
                        marks = _marks(len(chunk))
                        db.execute(f"INSERT INTO exchanges (trace_id, created, next_attempt, size, {RAW}) "
                                   f"SELECT trace_id, created, created, size, {RAW} FROM dead_letter "
                                   f"WHERE id IN ({marks}) ORDER BY id", chunk)
                        db.execute(f"DELETE FROM dead_letter WHERE id IN ({marks})", chunk)
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to the outbox {self.path}: {exc}") from exc
        return len(ids)

    # Lifecycle ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._db is None

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            self._claimed.clear()
        if db is not None:
            try:
                db.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass
            db.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Internals ----------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolClosed(f"the outbox {self.path} is closed")
        return self._db

    def _trim(self, db: sqlite3.Connection, count: int, size: int) -> int:
        if count <= self.max_records and size <= self.max_bytes:
            return 0
        victims: list[int] = []
        for rowid, row_size in db.execute("SELECT id, size FROM exchanges ORDER BY id"):
            if count <= self.max_records and size <= self.max_bytes:
                break
            if rowid in self._claimed:
                continue
            victims.append(rowid)
            count -= 1
            size -= row_size
        for chunk in _chunks(victims):
            db.execute(f"DELETE FROM exchanges WHERE id IN ({_marks(len(chunk))})", chunk)
        return len(victims)

    def _trim_dead(self, db: sqlite3.Connection) -> None:
        count, size = _counter(db, "dead_letter"), _counter(db, "dead_letter_bytes")
        if count <= self.max_dead and size <= self.max_dead_bytes:
            return
        victims: list[int] = []
        for rowid, row_size in db.execute("SELECT id, size FROM dead_letter ORDER BY id"):
            if count <= self.max_dead and size <= self.max_dead_bytes:
                break
            victims.append(rowid)
            count -= 1
            size -= row_size
        db.executemany("DELETE FROM dead_letter WHERE id = ?", [(i,) for i in victims])

    def _maybe_vacuum(self, db: sqlite3.Connection) -> None:
        if _counter(db, "pending") != 0:
            return
        free = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
        if free >= VACUUM_FREE_BYTES:
            db.execute("PRAGMA incremental_vacuum")


def read_stats(path: str | os.PathLike) -> dict:
    """Stats of an existing outbox file, read-only, creating nothing (for `r4u-mitm status`,
    with or without a proxy running). Raises FileNotFoundError when there is no such file."""
    path = Path(path).expanduser()
    return _read_only(path, lambda db: _stats(db, path))


def read_dead_letters(path: str | os.PathLike, reason: str | None = None, *, bodies: bool = False) -> list[dict]:
    """The dead letters of an existing outbox whose reason contains `reason` (ignoring case; all
    when None), oldest first, read-only like `read_stats`: trace_id, status, reason, failed_at,
    attempts and, with `bodies`, the raw exchange (`raw`, as `deliver.build` takes it)."""

    def read(db: sqlite3.Connection) -> list[dict]:
        rows = db.execute(f"SELECT {DEAD_COLUMNS}{', ' + RAW if bodies else ''} FROM dead_letter ORDER BY id")
        return [_dead_letter(row) for row in rows if _matches(row[2], reason)]

    return _read_only(Path(path).expanduser(), read)


def _read_only(path: Path, read):
    """`read(connection)` on the outbox at `path`, opened read-only."""
    if not path.is_file():
        raise FileNotFoundError(f"no outbox at {path}")
    uri = path.resolve().as_uri()
    # With no -wal file the database is quiescent: `immutable` reads it without creating the
    # -wal/-shm files a read-only WAL connection would leave behind. Otherwise a proxy may be
    # writing: read it properly (the -wal and -shm files exist already).
    modes = ["?mode=ro"] if Path(f"{path}-wal").exists() else ["?mode=ro&immutable=1", "?mode=ro"]
    error: Exception | None = None
    for mode in modes:
        try:
            db = sqlite3.connect(uri + mode, uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            error = exc
            continue
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION and db.execute("SELECT EXISTS (SELECT 1 FROM sqlite_master)").fetchone()[0]:
                raise RuntimeError(_other_version(path, version))
            return read(db)
        except sqlite3.Error as exc:
            error = exc
        finally:
            db.close()
    raise RuntimeError(f"cannot read the outbox {path}: {error}")


def _other_version(path: Path, version: int) -> str:
    if version == 0:
        return f"{path} is not an r4u-mitm outbox (a SQLite database of something else)"
    if version > SCHEMA_VERSION:
        return f"the outbox {path} was written by a newer r4u-mitm (schema {version})"
    return (f"the outbox {path} was written by an older r4u-mitm (schema {version}): start the proxy or "
            f"`r4u-mitm deliver --outbox {path}` once, which takes it over with its records")


# Helpers ------------------------------------------------------------------------------------------

def _read_big_bodies(db: sqlite3.Connection, row: tuple) -> tuple | None:
    """A claimed row with its big bodies (NULL in it) read by blob I/O: SQLite copies such a
    body straight into its bytes object, the GIL released, where a column value is copied twice
    (assembled whole by SQLite, then into Python, holding the GIL). None: the row is gone (a
    proxy dropped it, the outbox being full)."""
    row = list(row)
    try:
        for index, column in _BIG_BODIES:
            if row[index] is None:
                with db.blobopen("exchanges", column, row[0], readonly=True) as blob:
                    row[index] = blob.read()
    except sqlite3.OperationalError:
        return None
    return tuple(row)


def _insert(db: sqlite3.Connection, item: Packed, now: float) -> None:
    """One exchange into `exchanges`. Up to a slice, its values are bound (SQLite copies them,
    holding the GIL). A bigger one is written as zero-filled BLOBs (the last columns with data,
    so SQLite does not build the row in memory) that are then filled a slice at a time: the GIL
    is free while each slice is written, and the whole body is never copied at once."""
    sql = f"INSERT INTO exchanges (trace_id, created, next_attempt, size, {RAW}) VALUES (?, ?, ?, ?, ?, "
    if item.size <= SLICE:
        db.execute(sql + "?, ?, ?, ?)", (item.trace_id, now, now, item.size, item.head, *map(bytes, item[2:])))
        return
    rowid = db.execute(sql + "zeroblob(?), zeroblob(?), zeroblob(?), zeroblob(?))",
                       (item.trace_id, now, now, item.size, item.head, *map(len, item[2:]))).lastrowid
    for column, value in zip(_BLOBS, item[2:]):
        if len(value):
            view = value if isinstance(value, UnjoinedBody) else memoryview(value)
            with db.blobopen("exchanges", column, rowid) as blob:
                for at in range(0, len(view), SLICE):
                    blob.write(view[at:at + SLICE])


class _transaction:
    """BEGIN IMMEDIATE (unless `begun`) ... COMMIT, or ROLLBACK on error (the connection is in
    autocommit mode)."""

    __slots__ = ("db", "begun")

    def __init__(self, db: sqlite3.Connection, begun: bool = False) -> None:
        self.db = db
        self.begun = begun

    def __enter__(self) -> None:
        if not self.begun:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")


def _begin_now(db: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE without waiting: SpoolBusy when another connection holds the write lock."""
    db.execute("PRAGMA busy_timeout = 0")
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            raise
        raise SpoolBusy(str(exc)) from None
    finally:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _statements(script: str) -> list[str]:
    """Split the schema into statements (triggers contain `;` inside BEGIN ... END)."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _chunks(items: list, size: int = 500) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bump(db: sqlite3.Connection, name: str, n: int) -> None:
    db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (n, name))


def _counter(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _matches(reason: str | None, text: str | None) -> bool:
    return text is None or text.casefold() in (reason or "").casefold()


def _dead_letter(row: tuple) -> dict:
    """A row of `DEAD_COLUMNS` (and the raw exchange's columns, when selected) as a dict."""
    item = dict(zip(("trace_id", "status", "reason", "failed_at", "attempts"), row[:5]))
    if len(row) > 5:
        item["raw"] = Packed(row[0], *row[5:])
    return item


def _stats(db: sqlite3.Connection, path: Path) -> dict:
    values = dict(db.execute("SELECT name, value FROM counters").fetchall())
    oldest = db.execute("SELECT created, attempts, last_error FROM exchanges ORDER BY id LIMIT 1").fetchone()
    return {
        "outbox": str(path),
        "pending": values.get("pending", 0),
        "pending_bytes": values.get("pending_bytes", 0),
        "oldest_pending_age_s": round(max(0.0, time.time() - oldest[0]), 3) if oldest else None,
        "oldest_attempts": oldest[1] if oldest else None,
        "oldest_last_error": oldest[2] if oldest else None,
        "delivered": values.get("delivered", 0),
        "retried": values.get("retried", 0),
        "dead_lettered": values.get("dead_lettered", 0),
        "dead_letter_kept": values.get("dead_letter", 0),
        # what R4U said (or why the record could not be built), most frequent first
        "dead_letter_reasons": [{"status": status, "reason": reason, "count": n} for status, reason, n in db.execute(
            "SELECT status, reason, count(*) FROM dead_letter GROUP BY status, reason "
            "ORDER BY count(*) DESC, max(id) DESC")],
        "dropped": values.get("dropped", 0),
        "deliverer": {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM state")},
    }


def _create_private(path: Path) -> None:
    """Create the parent directories (0700 for the last) and the file itself with mode 0600,
    before SQLite opens it: SQLite gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    _tighten(path)


def _tighten(path: Path) -> None:
    """Take group/other access away from a file made before us with a looser mode."""
    for name in (str(path), f"{path}-wal", f"{path}-shm"):
        try:
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except OSError:
            pass
