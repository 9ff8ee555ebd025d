"""The spool: raw exchanges, durable, bounded, private; claims, outcomes, dedupe by trace id,
counters and the deliverer's state, stats without a proxy; a version 1 outbox is taken over."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from array import array
from types import SimpleNamespace

import pytest

from r4u_mitm import spool as spool_module
from r4u_mitm.delivery.deliver import build
from r4u_mitm.pure.record import Exchange, build_record
from r4u_mitm.spool import Spool, SpoolBusy, SpoolClosed, SpoolError, pack, read_dead_letters, read_stats, unpack

OPTIONS = {"max_body_bytes": 1 << 20, "redact": []}


def exchange(trace_id: str, size: int = 0, **extra) -> Exchange:
    return Exchange(trace_id=trace_id, provider="openai", url="https://api.openai.com/v1/chat/completions",
                    method="POST", path="/v1/chat/completions", request_headers=[("content-type", "application/json")],
                    request_body=b"q" * size, started_wall=1_700_000_000.0, started=10.0, ended=11.0,
                    status_code=200, response_headers=[("content-type", "application/json")],
                    pieces=[f'{{"answer": "réponse {trace_id} ✓"}}'.encode()],
                    **{"piece_times": array("d"), **extra})  # times as a tap and the spool keep them


def put(box: Spool, *ids: int, size: int = 0) -> int:
    """Append t<i> for each i, one transaction each; how many of the oldest were dropped."""
    return sum(box.append([pack(exchange(f"t{i}", size), OPTIONS)])[2] for i in ids)


def put1(box: Spool, trace_id: str, size: int = 0) -> int:
    return box.append([pack(exchange(trace_id, size), OPTIONS)])[2]


def trace_ids(rows) -> list[str]:
    return [row.trace_id for row in rows]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "deep" / "er" / "outbox.sqlite"


def test_an_exchange_comes_back_as_it_went_in_and_builds_the_same_record(path):
    ex = Exchange(trace_id="t1", provider="openai", url="https://api.openai.com/v1/chat/completions?x=1",
                  method="POST", path="/v1/chat/completions",
                  request_headers=[("content-type", "application/json"), ("x-odd", "caf\udce9")],
                  request_body=b'{"stream": true}', started_wall=1_700_000_000.5, started=10.0, ended=12.5,
                  status_code=200, response_headers=[("content-type", "text/event-stream")], headers_at=10.2,
                  stream=True, pieces=[b'data: {"choices":[]}\n', b"\n", b"data: [DONE]\n\n"],
                  piece_times=array("d", [10.3, 10.4, 12.4]), wire_bytes=40, truncated=False, transport_error="Client disconnected.",
                  properties={"session": "s1"}, note=None)
    with Spool(path) as box:
        assert box.append([pack(ex, OPTIONS)]) == (1, 0, 0)
        (row,) = box.claim(10)
    back, options = unpack(row)
    assert back == ex and options == OPTIONS
    assert build_record(back, **options) == build_record(ex, **OPTIONS)
    assert json.loads(build(row)) == build_record(ex, **OPTIONS)
    assert row.response_body == b"".join(ex.pieces)  # one contiguous body, pieces by offsets
    assert back.pieces.body is row.response_body and list(back.pieces) == ex.pieces  # sliced when read, not before


def test_a_claim_reads_big_bodies_apart_and_the_same(path, monkeypatch):
    """Bodies above BIG_BODY are read with blob I/O (SQLite does not assemble them first): the
    same bytes, small ones beside them as they were."""
    exchanges = [exchange(f"t{i}", size) for i, size in enumerate((0, 10, 11, 5000))]
    exchanges[2].pieces = [b"x" * 4000, "é".encode() * 3000]
    with Spool(path) as box:
        box.append([pack(ex, OPTIONS) for ex in exchanges])
        whole = box.claim(10)
        box.release()
        monkeypatch.setattr(spool_module, "_CLAIMED", spool_module._claimed_columns(10))
        apart = box.claim(10)
        assert apart == whole and [len(r.request_body) for r in apart] == [0, 10, 11, 5000]
        assert [unpack(r)[0] for r in apart] == exchanges
        # a row gone between the select and the blob read (a proxy dropped it): not claimed
        assert spool_module._read_big_bodies(box._conn(), (10**6, "t", 0, 0, b"{}", None, b"", b"", b"")) is None


def test_no_secret_header_or_query_parameter_is_stored(path):
    ex = exchange("t1")
    ex.url = "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=1&api-key=SECRET1"
    ex.request_headers = [("authorization", "Bearer SECRET2"), ("x-mine", "SECRET3"), ("accept", "*/*")]
    ex.response_headers = [("set-cookie", "s=SECRET4")]
    with Spool(path) as box:
        box.append([pack(ex, {**OPTIONS, "redact": ["X-Mine"]})])
    data = b"".join(p.read_bytes() for p in path.parent.iterdir())
    assert b"SECRET" not in data and b"*/*" in data


def test_a_trace_id_is_accepted_once(path):
    with Spool(path) as box:
        assert box.append([pack(exchange("t1"), OPTIONS), pack(exchange("t2"), OPTIONS)]) == (2, 0, 0)
        box.settle(delivered=[box.claim(1)[0].id])
        assert box.append([pack(exchange("t1"), OPTIONS), pack(exchange("t3"), OPTIONS)]) == (1, 1, 0)
        assert trace_ids(box.claim(10)) == ["t2", "t3"]
        assert box.pending_of(["t1", "t2", "t3", "t9"]) == 2


def test_a_version_1_outbox_is_taken_over_with_its_records(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE pending (id INTEGER PRIMARY KEY AUTOINCREMENT, trace_id TEXT NOT NULL, created REAL NOT NULL,
            next_attempt REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL, last_error TEXT,
            body BLOB NOT NULL);
        CREATE TABLE dead_letter (id INTEGER PRIMARY KEY AUTOINCREMENT, trace_id TEXT NOT NULL, created REAL NOT NULL,
            failed_at REAL NOT NULL, status INTEGER, reason TEXT, attempts INTEGER NOT NULL, size INTEGER NOT NULL,
            body BLOB NOT NULL);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        INSERT INTO counters VALUES ('delivered', 7);
        INSERT INTO pending (trace_id, created, next_attempt, size, body) VALUES ('old1', 1, 1, 13, CAST('{"record": 1}' AS BLOB));
        INSERT INTO dead_letter (trace_id, created, failed_at, status, reason, attempts, size, body)
            VALUES ('old2', 1, 2, 422, 'bad', 1, 13, CAST('{"record": 2}' AS BLOB));
        PRAGMA user_version = 1;
    """)
    db.close()
    with pytest.raises(RuntimeError, match=r"written by an older r4u-mitm \(schema 1\): start the proxy or "
                                           r"`r4u-mitm deliver --outbox .*old.sqlite` once"):
        read_stats(path)  # `r4u-mitm status` reads, creating nothing: it says what to do
    with Spool(path) as box:
        stats = box.stats()
        assert (stats["pending"], stats["pending_bytes"], stats["delivered"], stats["dead_letter_kept"]) == (1, 13, 7, 1)
        (row,) = box.claim(10)
        assert row.trace_id == "old1" and build(row) == b'{"record": 1}'  # posted as it is
        assert box.dead_letters()[0]["raw"].response_body == b'{"record": 2}'
    assert read_stats(path)["pending"] == 1  # taken over: status reads it


def test_status_of_a_database_that_is_no_outbox_or_is_newer(tmp_path):
    other, newer = tmp_path / "other.sqlite", tmp_path / "newer.sqlite"
    sqlite3.connect(other).executescript("CREATE TABLE notes (x);")
    sqlite3.connect(newer).executescript("CREATE TABLE notes (x); PRAGMA user_version = 99;")
    with pytest.raises(RuntimeError, match="is not an r4u-mitm outbox"):
        read_stats(other)
    with pytest.raises(RuntimeError, match=r"written by a newer r4u-mitm \(schema 99\)"):
        read_stats(newer)


def test_claims_oldest_first_and_never_twice_until_settled_or_released(path):
    with Spool(path) as box:
        put(box, *range(1, 6))
        first = box.claim(2)
        assert trace_ids(first) == ["t1", "t2"]
        assert trace_ids(box.claim(10)) == ["t3", "t4", "t5"]
        assert box.claim(10) == []
        box.release([first[0].id])
        assert trace_ids(box.claim(10)) == ["t1"]
        box.release()
        assert len(box.claim(10)) == 5


def test_due_tells_what_a_claim_would_take_and_take_claims_it(path):
    with Spool(path) as box:
        put(box, 1)
        put(box, 2, size=50_000)
        put(box, 3)
        due = box.due(2)
        rows = box.take([rowid for rowid, _ in due])
        assert trace_ids(rows) == ["t1", "t2"] and [size for _, size in due] == [row.size for row in rows]
        assert due[1][1] > 50_000 > due[0][1]
        assert box.take([rowid for rowid, _ in due]) == []  # claimed: not handed out twice
        assert trace_ids(box.take([rowid for rowid, _ in box.due(10)])) == ["t3"] and box.due(10) == []


def test_a_settle_that_must_not_wait_says_busy_while_another_connection_writes(path):
    with Spool(path) as box:
        put(box, 1, 2)
        rows = box.claim(10)
        other = sqlite3.connect(path, isolation_level=None)  # a proxy in the middle of an append
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(SpoolBusy):
                box.settle(delivered=[rows[0].id], wait=False)
            assert box.stats()["claimed"] == 2  # nothing changed: still claimed
        finally:
            other.execute("ROLLBACK")
            other.close()
        box.settle(delivered=[rows[0].id], wait=False)
        assert box._conn().execute("PRAGMA busy_timeout").fetchone()[0] == spool_module.BUSY_TIMEOUT_MS  # others wait
        box.settle(delivered=[rows[1].id])
        stats = box.stats()
        assert (stats["pending"], stats["delivered"], stats["claimed"]) == (0, 2, 0)


def test_delivered_records_are_deleted_and_counted(path):
    with Spool(path) as box:
        put(box, 1, 2, 3)
        rows = box.claim(10)
        box.settle(delivered=[rows[0].id, rows[2].id])
        stats = box.stats()
        assert stats["pending"] == 1 and stats["delivered"] == 2 and stats["claimed"] == 1
        box.settle(delivered=[rows[1].id])
        assert box.stats()["pending"] == 0 and box.stats()["pending_bytes"] == 0


def test_retry_waits_until_due_and_counts_attempts(path):
    with Spool(path) as box:
        put(box, 1, 2)
        (a, b) = box.claim(10)
        later = time.time() + 3600
        box.settle(retry=[(a.id, later, "HTTP 503: busy")], delivered=[b.id])
        assert box.claim(10) == []                               # not due yet
        assert box.next_due() == pytest.approx(later)
        (again,) = box.claim(10, now=later + 1)
        assert again.trace_id == "t1" and again.attempts == 1
        box.release()
        stats = box.stats()
        assert stats["retried"] == 1 and stats["oldest_attempts"] == 1 and stats["oldest_last_error"] == "HTTP 503: busy"
        assert box.make_due() == 1
        assert trace_ids(box.claim(10)) == ["t1"]


def test_dead_letter_moves_the_record_with_status_and_a_short_reason(path):
    with Spool(path) as box:
        put(box, 1, 2)
        (a, b) = box.claim(10)
        box.settle(dead=[(a.id, 422, "body.started_at: Input should have timezone info " + "x" * 500)])
        stats = box.stats()
        assert stats["pending"] == 1 and stats["dead_lettered"] == 1 and stats["dead_letter_kept"] == 1
        (dead,) = box.dead_letters()
        assert dead["trace_id"] == "t1" and dead["status"] == 422 and dead["attempts"] == 1
        assert dead["reason"].startswith("body.started_at: Input should") and len(dead["reason"]) <= 200
        assert unpack(dead["raw"])[0] == exchange("t1")  # the raw exchange: it can be rebuilt
        assert trace_ids(box.claim(10)) == []  # t2 is still claimed
        box.release()
        assert trace_ids(box.claim(10)) == ["t2"]


def test_full_by_count_drops_the_oldest_and_says_how_many(path):
    with Spool(path, max_records=3, max_bytes=10**9) as box:
        assert put(box, 1, 2, 3) == 0
        assert put1(box, "t4") == 1
        assert put1(box, "t5") == 1
        assert trace_ids(box.claim(10)) == ["t3", "t4", "t5"]
        assert box.stats()["dropped"] == 2 and box.stats()["pending"] == 3


def test_full_by_bytes_drops_as_many_oldest_as_needed(path):
    size = pack(exchange("t1", 1000), OPTIONS).size
    with Spool(path, max_records=1000, max_bytes=size * 4) as box:
        assert put(box, 1, 2, 3, 4, size=1000) == 0
        assert put1(box, "big", 2 * size) == 3  # needs the room of three small ones
        assert trace_ids(box.claim(10)) == ["t4", "big"]
        assert box.stats()["pending_bytes"] <= size * 4
        assert box.stats()["dropped"] == 3


def test_a_record_bigger_than_the_whole_outbox_is_dropped_itself(path):
    with Spool(path, max_records=10, max_bytes=500) as box:
        assert put1(box, "huge", 10_000) == 1
        assert box.stats()["pending"] == 0 and box.stats()["dropped"] == 1


def test_claimed_records_are_not_dropped(path):
    with Spool(path, max_records=2, max_bytes=10**9) as box:
        put(box, 1, 2)
        in_flight = box.claim(1)
        assert put1(box, "t3") == 1
        box.release()
        assert trace_ids(box.claim(10)) == ["t1", "t3"]
        assert trace_ids(in_flight) == ["t1"]


def test_file_and_its_wal_and_shm_are_private(path):
    old = os.umask(0o000)  # even with a permissive umask
    try:
        with Spool(path) as box:
            put(box, 1)
            for name in (path, f"{path}-wal", f"{path}-shm"):
                assert os.path.exists(name), name
                assert stat.S_IMODE(os.stat(name).st_mode) == 0o600, name
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    finally:
        os.umask(old)


def test_an_existing_file_with_a_loose_mode_is_tightened(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.touch()
    os.chmod(path, 0o644)
    Spool(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_wal_and_normal_sync(path):
    with Spool(path):
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_failures_are_counted_apart_from_attempts(path):
    """R4U failing on a record (`failed`) counts in `failures`, which the deliverer caps; any
    retry counts in `attempts`."""
    with Spool(path) as box:
        put(box, 1)
        (row,) = box.claim(10)
        assert (row.attempts, row.failures) == (0, 0)
        box.settle(retry=[(row.id, 0.0, "no answer within 10s")])
        (row,) = box.claim(10)
        box.settle(failed=[(row.id, 0.0, "HTTP 500: Internal error parsing HTTP trace")])
        (row,) = box.claim(10)
        assert (row.attempts, row.failures) == (2, 1)
        box.settle(dead=[(row.id, 500, "HTTP 500: Internal error parsing HTTP trace")])
        assert box.stats()["retried"] == 2 and box.dead_letters()[0]["attempts"] == 3


def test_a_version_2_outbox_gains_the_failure_count(path):
    with Spool(path) as box:
        put(box, 1)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE v2 AS SELECT id, trace_id, created, next_attempt, attempts, last_error, size, head, request_body,
            response_body, piece_ends, piece_times FROM exchanges;
        DROP TABLE exchanges;
        ALTER TABLE v2 RENAME TO exchanges;
        PRAGMA user_version = 2;
    """)
    db.close()
    with Spool(path) as box:
        (row,) = box.claim(10)
        assert row.trace_id == "t1" and row.failures == 0
        box.settle(failed=[(row.id, 0.0, "HTTP 500")])
        assert box.claim(10)[0].failures == 1
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def test_dead_letters_are_grouped_by_reason_read_without_writing_and_requeued(path):
    with Spool(path) as box:
        put(box, *range(1, 6))
        rows = box.claim(10)
        box.settle(dead=[(rows[0].id, 500, "HTTP 500: Internal error parsing HTTP trace: 'str'"),
                         (rows[1].id, 422, "HTTP 422: body.started_at: Field required"),
                         (rows[2].id, 500, "HTTP 500: Internal error parsing HTTP trace: 'str'"),
                         (rows[3].id, None, "cannot build the record: TypeError: x")])
    assert read_stats(path)["dead_letter_reasons"] == [
        {"status": 500, "reason": "HTTP 500: Internal error parsing HTTP trace: 'str'", "count": 2},
        {"status": None, "reason": "cannot build the record: TypeError: x", "count": 1},
        {"status": 422, "reason": "HTTP 422: body.started_at: Field required", "count": 1}]
    before = sorted(os.listdir(path.parent))
    assert [d["trace_id"] for d in read_dead_letters(path)] == ["t1", "t2", "t3", "t4"]  # oldest first
    found = read_dead_letters(path, "internal ERROR", bodies=True)  # a part of the reason, any case
    assert [d["trace_id"] for d in found] == ["t1", "t3"] and unpack(found[0]["raw"])[0] == exchange("t1")
    assert "raw" not in read_dead_letters(path, "422")[0] and read_dead_letters(path, "nothing like it") == []
    assert sorted(os.listdir(path.parent)) == before  # read-only
    with Spool(path) as box:
        assert box.requeue_dead("parsing") == 2
        stats = box.stats()
        assert (stats["pending"], stats["dead_letter_kept"], stats["dead_lettered"]) == (3, 2, 4)
        again = box.claim(10)
        assert trace_ids(again) == ["t1", "t3", "t5"]  # due now; t5 was never dead
        assert again[0].attempts == again[0].failures == 0  # a fresh start
        assert unpack(again[0])[0] == exchange("t1")
        assert box.requeue_dead("parsing") == 0
        assert box.requeue_dead() == 2
        assert box.stats()["dead_letter_kept"] == 0 and box.stats()["dead_letter_reasons"] == []


def test_everything_survives_a_reopen(path):
    with Spool(path) as box:
        put(box, 1, 2, 3, 4)
        rows = box.claim(10)
        box.settle(delivered=[rows[0].id], retry=[(rows[1].id, time.time() + 3600, "HTTP 500")],
                   dead=[(rows[2].id, 400, "bad")])
    with Spool(path) as box:
        stats = box.stats()
        assert (stats["pending"], stats["delivered"], stats["retried"], stats["dead_lettered"]) == (2, 1, 1, 1)
        assert trace_ids(box.claim(10)) == ["t4"]  # t2 waits for its retry time...
        box.make_due()                              # ...until a new run makes it due
        assert trace_ids(box.claim(10)) == ["t2"]


def test_records_survive_kill_9(path):
    code = (
        "import os, sys; from r4u_mitm.spool import Spool, pack; from tests.test_spool import exchange, OPTIONS\n"
        f"box = Spool({str(path)!r})\n"
        "for i in range(50): box.append([pack(exchange(f't{i}'), OPTIONS)])\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -9
    with Spool(path) as box:
        assert len(box.claim(100)) == 50


def test_closed_outbox_says_so(path):
    box = Spool(path)
    box.close()
    box.close()  # twice is fine
    with pytest.raises(SpoolClosed):
        put(box, 1)


def test_read_stats_reads_without_creating_anything(path, tmp_path, monkeypatch):
    now = [1_700_000_000.0]  # the spool's wall clock, set by the test
    monkeypatch.setattr(spool_module, "time", SimpleNamespace(time=lambda: now[0]))
    with Spool(path) as box:
        put(box, 1)
        now[0] += 10
        put(box, 2)
        box.settle(delivered=[box.claim(1)[0].id])
        now[0] += 2.5
        live = read_stats(path)  # while the spool is open (a proxy running)
        assert live["pending"] == 1 and live["delivered"] == 1
        assert live["oldest_pending_age_s"] == 2.5  # t2's age: t1, older, was delivered
    before = sorted(os.listdir(path.parent))
    now[0] += 30
    stats = read_stats(path)
    assert sorted(os.listdir(path.parent)) == before == ["outbox.sqlite"]
    assert stats["pending"] == 1 and stats["delivered"] == 1 and stats["outbox"] == str(path)
    assert stats["oldest_pending_age_s"] == 32.5
    with pytest.raises(FileNotFoundError):
        read_stats(tmp_path / "nothing.sqlite")
    assert not (tmp_path / "nothing.sqlite").exists()


def test_bounds_must_be_positive(path):
    with pytest.raises(ValueError):
        Spool(path, max_records=0)


def test_a_file_that_is_not_an_outbox_says_so(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(SpoolError, match=r"is not an r4u-mitm outbox \(not a SQLite database\)$"):
        Spool(path)
    assert path.read_bytes() == b"this is not a database at all" * 100


def test_someone_elses_database_is_left_alone(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE pending (x)")
    before = path.read_bytes()
    with pytest.raises(SpoolError, match=r"is not an r4u-mitm outbox \(a SQLite database of something else\)$"):
        Spool(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["app.db"]  # not even a -wal file


def test_a_place_that_cannot_be_written_says_so(tmp_path):
    with pytest.raises(SpoolError, match="^cannot create /proc/r4u/outbox.sqlite: No such file or directory$") as err:
        Spool("/proc/r4u/outbox.sqlite")
    assert isinstance(err.value.__cause__, OSError)


def test_secret_body_members_never_reach_the_disk_and_the_pieces_keep_their_times(path):
    secret = "sk-SECRET-body-0042"
    events = [b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
              b'data: {"choices":[],"client_secret":{"value":"' + secret.encode() + b'"},"usage":{"total_tokens":3}}\n\n',
              b"data: [DONE]\n\n"]
    raw = b"".join(events)
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]  # a secret cut across pieces
    ex = exchange("t1")
    ex.request_body = b'{"model":"m","api_key":"' + secret.encode() + b'","max_tokens":5}'
    ex.response_headers = [("content-type", "text/event-stream")]
    ex.stream, ex.pieces, ex.piece_times = True, pieces, [10.0 + i / 100 for i in range(len(pieces))]
    with Spool(path) as box:
        box.append([pack(ex, {**OPTIONS, "redact_body_keys": ["nothing_here"]})])
        (row,) = box.claim(1)
    assert secret.encode() not in b"".join(p.read_bytes() for p in path.parent.iterdir())
    back, options = unpack(row)
    assert b"".join(back.pieces) == raw.replace(b'{"value":"' + secret.encode() + b'"}', b'"[REDACTED]"')
    assert len(back.pieces) == len(back.piece_times) == len(pieces) and back.piece_times.tolist() == list(ex.piece_times)
    assert back.request_body == b'{"model":"m","api_key":"[REDACTED]","max_tokens":5}'
    record, original = build_record(back, **options), build_record(ex, **options)
    assert record["response"] == original["response"] and record["metadata"] == original["metadata"]


def test_a_compressed_body_is_stored_as_it_came(path):
    import gzip

    ex = exchange("t1")
    ex.pieces = [gzip.compress(b'{"api_key":"sk-in-gzip"}')]
    ex.response_headers = [("content-type", "application/json"), ("content-encoding", "gzip")]
    with Spool(path) as box:
        box.append([pack(ex, OPTIONS)])
        (row,) = box.claim(1)
    assert row.response_body == ex.pieces[0]  # not decoded in the proxy: the deliverer redacts it
    assert json.loads(build(row))["response"] == '{"api_key":"[REDACTED]"}'


def big_stream(trace_id: str, events: int, secret: bytes = b"", piece: int = 37) -> Exchange:
    """A streamed exchange of `events` events in pieces of `piece` bytes (bigger than a slice when
    `SLICE` is small), its request a single big body; `secret` in one event, cut across pieces."""
    ex = exchange(trace_id, 5000)
    ex.request_body = b'{"messages": "' + b"q" * 5000 + b'"}'
    raw = b"".join(b'data: {"choices":[{"delta":{"content":"w%d"}}]}\n\n' % i for i in range(events))
    if secret:
        raw += b'data: {"choices":[],"client_secret":{"value":"' + secret + b'"}}\n\n'
    ex.response_headers = [("content-type", "text/event-stream")]
    ex.stream, ex.pieces = True, [raw[i:i + piece] for i in range(0, len(raw), piece)]
    ex.piece_times = array("d", [10.0 + i / 1000 for i in range(len(ex.pieces))])
    return ex


def test_pieces_slice_as_the_joined_body_does():
    from array import array
    from itertools import accumulate

    pieces = [bytes([65 + i % 26]) * (i % 5 + 1) for i in range(40)]
    body, joined = spool_module.UnjoinedBody(pieces, array("Q", accumulate(map(len, pieces)))), b"".join(pieces)
    assert len(body) == len(joined) and bytes(body) == joined
    for start in range(0, len(joined) + 2):
        for stop in range(start - 1, len(joined) + 3):
            assert body[start:stop] == joined[start:stop], (start, stop)
    assert body[-7:] == joined[-7:] and len(spool_module.UnjoinedBody([], array("Q"))) == 0


def test_a_big_exchange_is_written_a_slice_at_a_time_from_its_pieces(path, monkeypatch):
    """The proxy's writer: a stream bigger than a slice is stored from its pieces, unjoined, and a
    big request in slices; the row is the one the joined exchange gives, to the byte."""
    monkeypatch.setattr(spool_module, "SLICE", 1000)
    monkeypatch.setattr(spool_module, "PIECES_STEP", 7)
    ex = big_stream("t1", 300)
    packed = pack(ex, OPTIONS, joined=False)
    assert isinstance(packed.response_body, spool_module.UnjoinedBody) and packed.response_body.pieces is ex.pieces
    joined = pack(ex, OPTIONS)
    with Spool(path) as box:
        assert box.append([packed]) == (1, 0, 0)
        (row,) = box.claim(1)
    assert (row.head, row.request_body, row.response_body, row.piece_ends, row.piece_times) == joined[1:]
    back, options = unpack(row)
    assert back == ex and options == OPTIONS


def test_a_secret_in_a_big_stream_never_reaches_the_disk(path, monkeypatch):
    from r4u_mitm.pure import redact

    monkeypatch.setattr(spool_module, "SLICE", 1000)
    monkeypatch.setattr(redact, "WINDOW", 500)  # the pre-check's windows cut the pieces elsewhere
    secret = b"sk-SECRET-big-0042"
    ex = big_stream("t1", 300, secret)
    with Spool(path) as box:
        box.append([pack(ex, OPTIONS, joined=False)])
        (row,) = box.claim(1)
    assert secret not in b"".join(p.read_bytes() for p in path.parent.iterdir())
    back, _ = unpack(row)
    assert b"".join(back.pieces) == b"".join(ex.pieces).replace(b'{"value":"' + secret + b'"}', b'"[REDACTED]"')
    assert len(back.pieces) == len(ex.pieces) and back.piece_times.tolist() == list(ex.piece_times)


def test_a_big_stream_is_stored_without_a_copy_of_it_in_memory(path):
    """No join of the pieces, no copy bound to the statement, no row built in memory by SQLite:
    storing a 48 MB stream (in pieces of an event's size) raises the process's peak memory by a small
    part of that."""
    code = (
        "import sys; from r4u_mitm.spool import Spool, pack; from tests.test_spool import big_stream, OPTIONS\n"
        "def hwm():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024\n"
        f"box = Spool({str(path)!r}); box.append([pack(big_stream('small', 10), OPTIONS, joined=False)])\n"
        "ex = big_stream('t1', 1_000_000, piece=300)\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # the peak so far: what is held now\n"
        "before = hwm(); box.append([pack(ex, OPTIONS, joined=False)])\n"
        "print(sum(map(len, ex.pieces)) // 2**20, hwm() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, check=True).stdout
    body_mb, grown_mb = map(int, out.split())
    assert body_mb >= 40 and grown_mb < body_mb / 3, out  # a copy would be all of it



def test_a_writer_may_leave_checkpoints_to_another_connection(path):
    with Spool(path, checkpoint_pages=16384) as writer, Spool(path) as other:
        assert writer._conn().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 16384
        assert other._conn().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
