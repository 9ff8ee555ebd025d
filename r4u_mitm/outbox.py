"""The outbox: a durable, bounded queue of R4U records in one SQLite file (WAL), plus the
dead-letter table and the delivery counters. Knows nothing of HTTP or mitmproxy flows.

A record goes in once, serialized once (compact UTF-8 JSON), and leaves only when R4U has it
(`settle(delivered=...)`), when R4U refuses it for good (dead letter), or when the outbox is full
and it is the oldest (counted in `dropped`, and `put` says how many, so the caller logs it).
Rows survive a crash or `kill -9` (WAL, synchronous=NORMAL: only a power loss may lose the last
few commits). The file and its -wal/-shm companions are private to the user (mode 0600): they
hold prompts and answers.

Every method takes one lock: the delivery calls them from its store thread and, at shutdown,
from a drain thread. Claims are kept in memory: a claimed row is not handed out again until it
is settled or released; a new process starts with no claims, so whatever an earlier run left
(even one killed mid-post) is delivered again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from r4u_mitm.recordjson import encode_record

__all__ = ["Outbox", "OutboxClosed", "OutboxError", "read_stats", "DEFAULT_MAX_RECORDS", "DEFAULT_MAX_BYTES"]

# Sized for a day of heavy use on a laptop: ~100k exchanges, ~10 KB each on average, with
# room for some large streams, before anything is dropped.
DEFAULT_MAX_RECORDS = 100_000
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024  # 1 GiB

SCHEMA_VERSION = 1
REASON_MAX = 200
ERROR_MAX = 200
COUNTERS = ("delivered", "retried", "dead_lettered", "dropped")
# Running totals kept by triggers, so bounds and stats are O(1) and exact for every connection.
TOTALS = ("pending", "pending_bytes", "dead_letter", "dead_letter_bytes")
# Give the freed pages back to the file system when the outbox empties and this much is free.
VACUUM_FREE_BYTES = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id     TEXT    NOT NULL,
    created      REAL    NOT NULL,
    next_attempt REAL    NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    size         INTEGER NOT NULL,
    last_error   TEXT,
    body         BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_due ON pending (next_attempt, id);
CREATE TABLE IF NOT EXISTS dead_letter (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id  TEXT    NOT NULL,
    created   REAL    NOT NULL,
    failed_at REAL    NOT NULL,
    status    INTEGER,
    reason    TEXT,
    attempts  INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    body      BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pending_added AFTER INSERT ON pending BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'pending';
    UPDATE counters SET value = value + NEW.size WHERE name = 'pending_bytes';
END;
CREATE TRIGGER IF NOT EXISTS pending_removed AFTER DELETE ON pending BEGIN
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
"""


class OutboxError(RuntimeError):
    """The outbox file cannot be opened or used (not SQLite, no permission, a newer schema...)."""


class OutboxClosed(RuntimeError):
    """The outbox was closed; open a new one on the same file."""


def encode(record: dict) -> bytes:
    """The record as it is stored and sent: compact JSON, UTF-8, serialized once."""
    return encode_record(record)


class Outbox:
    """Pending records, dead letters and counters in the SQLite file `path`.

    Bounds: `max_records` pending records and `max_bytes` of pending bodies (defaults: 100,000
    records and 1 GiB, a day of heavy use on a laptop). A `put` that goes beyond either drops the
    oldest pending records (never one that is claimed, i.e. being posted) and returns how many.
    The dead-letter table keeps the most recent `max(100, max_records // 10)` rows and at most
    `max_bytes // 10` bytes.
    """

    def __init__(self, path: str | os.PathLike, *, max_records: int = DEFAULT_MAX_RECORDS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
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
            raise OutboxError(f"cannot {'open' if existed else 'create'} {self.path}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open {self.path}: {exc}") from exc
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            # Someone else's database is left as it is (before any PRAGMA below changes it);
            # one statement, one snapshot: another process may be creating our schema right now.
            if db.execute("SELECT (SELECT user_version FROM pragma_user_version) = 0 "
                          "AND EXISTS (SELECT 1 FROM sqlite_master)").fetchone()[0]:
                raise OutboxError(f"{self.path} is not an r4u-mitm outbox (a SQLite database of something else)")
            # auto_vacuum only takes on a new file, before any table: it lets the file shrink.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL on {self.path} (journal_mode={mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            with _transaction(db):
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise OutboxError(f"{self.path} was written by a newer r4u-mitm (schema {version})")
                for statement in _statements(_SCHEMA):
                    db.execute(statement)
                db.executemany("INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
                               [(name,) for name in COUNTERS + TOTALS])
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_NOTADB:
                raise OutboxError(f"{self.path} is not an r4u-mitm outbox (not a SQLite database)") from exc
            raise OutboxError(f"cannot use {self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db: sqlite3.Connection | None = db
        _tighten(self.path)

    # Writing ------------------------------------------------------------------------------------

    def put(self, trace_id: str, record: dict) -> int:
        """Store `record` (serialized here, once) as pending and due now. Returns how many of the
        oldest pending records were dropped to stay within the bounds (0 nearly always)."""
        body = encode(record)
        now = time.time()
        with self._lock:
            db = self._conn()
            with _transaction(db):
                db.execute(
                    "INSERT INTO pending (trace_id, created, next_attempt, size, body) VALUES (?, ?, ?, ?, ?)",
                    (trace_id, now, now, len(body), body),
                )
                dropped = self._trim(db)
                if dropped:
                    _bump(db, "dropped", dropped)
            return dropped

    def claim(self, limit: int, now: float | None = None) -> list[tuple[int, str, bytes, int]]:
        """Up to `limit` due records (`next_attempt <= now`), the longest-waiting first, as
        `(rowid, trace_id, body, attempts)`. They are not handed out again until settled or
        released."""
        now = time.time() if now is None else now
        with self._lock:
            db = self._conn()
            # One row for the ids (group_concat): each row fetched is a GIL round trip, which
            # is slow when the event loop's thread is busy.
            (found,) = db.execute(
                "SELECT group_concat(id) FROM "
                "(SELECT id FROM pending WHERE next_attempt <= ? ORDER BY next_attempt, id LIMIT ?)",
                (now, limit + len(self._claimed)),
            ).fetchone()
            ids = [rowid for rowid in map(int, found.split(",")) if rowid not in self._claimed][:limit] if found else []
            if not ids:
                return []
            rows = {row[0]: row for row in db.execute(
                f"SELECT id, trace_id, body, attempts FROM pending WHERE id IN ({_marks(len(ids))})", ids)}
            out = [rows[i] for i in ids if i in rows]
            self._claimed.update(row[0] for row in out)
            return out

    def settle(self, delivered: Iterable[int] = (),
               retry: Iterable[tuple[int, float, str]] = (),
               dead: Iterable[tuple[int, int | None, str]] = ()) -> None:
        """Record what became of claimed records, in one transaction:
        `delivered` rowids are deleted (counted in `delivered`); `retry` items
        `(rowid, next_attempt, error)` are tried again from `next_attempt` (wall clock; attempts+1,
        counted in `retried`); `dead` items `(rowid, http_status, reason)` move to the dead-letter
        table (counted in `dead_lettered`). The rowids are no longer claimed afterwards, even if
        this fails (then they are simply delivered again later)."""
        delivered, retry, dead = list(delivered), list(retry), list(dead)
        touched = set(delivered) | {r[0] for r in retry} | {d[0] for d in dead}
        if not touched:
            return
        now = time.time()
        with self._lock:
            try:
                db = self._conn()
                with _transaction(db):
                    if delivered:
                        for chunk in _chunks(delivered):  # one statement per chunk, not per row
                            db.execute(f"DELETE FROM pending WHERE id IN ({_marks(len(chunk))})", chunk)
                        _bump(db, "delivered", len(delivered))
                    if retry:
                        db.executemany(
                            "UPDATE pending SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                            [(at, (error or "")[:ERROR_MAX], rowid) for rowid, at, error in retry],
                        )
                        _bump(db, "retried", len(retry))
                    if dead:
                        for rowid, status, reason in dead:
                            db.execute(
                                "INSERT INTO dead_letter (trace_id, created, failed_at, status, reason, attempts, size, body) "
                                "SELECT trace_id, created, ?, ?, ?, attempts + 1, size, body FROM pending WHERE id = ?",
                                (now, status, (reason or "")[:REASON_MAX], rowid),
                            )
                            db.execute("DELETE FROM pending WHERE id = ?", (rowid,))
                        _bump(db, "dead_lettered", len(dead))
                        self._trim_dead(db)
                self._maybe_vacuum(db)
            finally:
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
                return db.execute("UPDATE pending SET next_attempt = created WHERE next_attempt > ?",
                                  (time.time(),)).rowcount

    # Reading ------------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When (wall clock) the next unclaimed pending record is due, or None when none is pending."""
        with self._lock:
            db = self._conn()
            limit = 1 + len(self._claimed)
            for rowid, at in db.execute("SELECT id, next_attempt FROM pending ORDER BY next_attempt, id LIMIT ?", (limit,)):
                if rowid not in self._claimed:
                    return at
            return None

    def stats(self) -> dict:
        """Counts and counters (cheap: the totals are kept by triggers)."""
        with self._lock:
            out = _stats(self._conn(), self.path)
            out["claimed"] = len(self._claimed)
            return out

    def pending_count(self) -> int:
        with self._lock:
            return _counter(self._conn(), "pending")

    def dead_letters(self, limit: int = 100) -> list[dict]:
        """The most recent dead letters (newest first), bodies included, for inspection."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT trace_id, status, reason, failed_at, attempts, body FROM dead_letter ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(zip(("trace_id", "status", "reason", "failed_at", "attempts", "body"), row)) for row in rows]

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

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Internals ----------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxClosed(f"the outbox {self.path} is closed")
        return self._db

    def _trim(self, db: sqlite3.Connection) -> int:
        count, size = _counter(db, "pending"), _counter(db, "pending_bytes")
        if count <= self.max_records and size <= self.max_bytes:
            return 0
        victims: list[int] = []
        for rowid, row_size in db.execute("SELECT id, size FROM pending ORDER BY id"):
            if count <= self.max_records and size <= self.max_bytes:
                break
            if rowid in self._claimed:
                continue
            victims.append(rowid)
            count -= 1
            size -= row_size
        for chunk in _chunks(victims):
            db.execute(f"DELETE FROM pending WHERE id IN ({_marks(len(chunk))})", chunk)
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
            return _stats(db, path)
        except sqlite3.Error as exc:
            error = exc
        finally:
            db.close()
    raise RuntimeError(f"cannot read the outbox {path}: {error}")


# Helpers ------------------------------------------------------------------------------------------

class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    __slots__ = ("db",)

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")


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


def _chunks(items: list[int], size: int = 500) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _bump(db: sqlite3.Connection, name: str, n: int) -> None:
    db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (n, name))


def _counter(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _stats(db: sqlite3.Connection, path: Path) -> dict:
    values = dict(db.execute("SELECT name, value FROM counters").fetchall())
    oldest = db.execute("SELECT created, attempts, last_error FROM pending ORDER BY id LIMIT 1").fetchone()
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
        "dropped": values.get("dropped", 0),
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
