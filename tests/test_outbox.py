"""The outbox: durable, bounded, private; claims, outcomes, counters, stats without a proxy."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from r4u_mitm import outbox as outbox_module
from r4u_mitm.outbox import Outbox, OutboxClosed, OutboxError, encode, read_stats


def record(i: int, size: int = 0, **extra) -> dict:
    return {"started_at": "2025-01-01T00:00:00+00:00", "completed_at": "2025-01-01T00:00:01+00:00",
            "status_code": 200, "request": "q" * size, "request_headers": {}, "response": f"réponse {i} ✓",
            "response_headers": {}, "metadata": {"trace_id": f"t{i}"}, **extra}


def put(box: Outbox, *ids: int, size: int = 0) -> int:
    return sum(box.put(f"t{i}", record(i, size)) for i in ids)


def trace_ids(rows) -> list[str]:
    return [row[1] for row in rows]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "deep" / "er" / "outbox.sqlite"


def test_put_stores_compact_utf8_json_once_and_claim_returns_it(path):
    with Outbox(path) as box:
        assert box.put("t1", record(1)) == 0
        ((rowid, trace_id, body, attempts),) = box.claim(10)
    assert trace_id == "t1" and attempts == 0 and isinstance(body, bytes)
    assert body == json.dumps(record(1), separators=(",", ":"), ensure_ascii=False).encode()
    assert "réponse 1 ✓".encode() in body and b", " not in body and b'": ' not in body
    assert json.loads(body) == record(1)


def test_encode_keeps_lone_surrogates_as_valid_json():
    body = encode({"response": "bad \udc80 text"})
    assert json.loads(body) == {"response": "bad \udc80 text"}


def test_claims_oldest_first_and_never_twice_until_settled_or_released(path):
    with Outbox(path) as box:
        put(box, *range(1, 6))
        first = box.claim(2)
        assert trace_ids(first) == ["t1", "t2"]
        assert trace_ids(box.claim(10)) == ["t3", "t4", "t5"]
        assert box.claim(10) == []
        box.release([first[0][0]])
        assert trace_ids(box.claim(10)) == ["t1"]
        box.release()
        assert len(box.claim(10)) == 5


def test_delivered_records_are_deleted_and_counted(path):
    with Outbox(path) as box:
        put(box, 1, 2, 3)
        rows = box.claim(10)
        box.settle(delivered=[rows[0][0], rows[2][0]])
        stats = box.stats()
        assert stats["pending"] == 1 and stats["delivered"] == 2 and stats["claimed"] == 1
        box.settle(delivered=[rows[1][0]])
        assert box.stats()["pending"] == 0 and box.stats()["pending_bytes"] == 0


def test_retry_waits_until_due_and_counts_attempts(path):
    with Outbox(path) as box:
        put(box, 1, 2)
        (a, b) = box.claim(10)
        later = time.time() + 3600
        box.settle(retry=[(a[0], later, "HTTP 503: busy")], delivered=[b[0]])
        assert box.claim(10) == []                               # not due yet
        assert box.next_due() == pytest.approx(later)
        (again,) = box.claim(10, now=later + 1)
        assert again[1] == "t1" and again[3] == 1
        box.release()
        stats = box.stats()
        assert stats["retried"] == 1 and stats["oldest_attempts"] == 1 and stats["oldest_last_error"] == "HTTP 503: busy"
        assert box.make_due() == 1
        assert trace_ids(box.claim(10)) == ["t1"]


def test_dead_letter_moves_the_record_with_status_and_a_short_reason(path):
    with Outbox(path) as box:
        put(box, 1, 2)
        (a, b) = box.claim(10)
        box.settle(dead=[(a[0], 422, "body.started_at: Input should have timezone info " + "x" * 500)])
        stats = box.stats()
        assert stats["pending"] == 1 and stats["dead_lettered"] == 1 and stats["dead_letter_kept"] == 1
        (dead,) = box.dead_letters()
        assert dead["trace_id"] == "t1" and dead["status"] == 422 and dead["attempts"] == 1
        assert dead["reason"].startswith("body.started_at: Input should") and len(dead["reason"]) <= 200
        assert json.loads(dead["body"]) == record(1)
        assert trace_ids(box.claim(10)) == []  # t2 is still claimed
        box.release()
        assert trace_ids(box.claim(10)) == ["t2"]


def test_full_by_count_drops_the_oldest_and_says_how_many(path):
    with Outbox(path, max_records=3, max_bytes=10**9) as box:
        assert put(box, 1, 2, 3) == 0
        assert box.put("t4", record(4)) == 1
        assert box.put("t5", record(5)) == 1
        assert trace_ids(box.claim(10)) == ["t3", "t4", "t5"]
        assert box.stats()["dropped"] == 2 and box.stats()["pending"] == 3


def test_full_by_bytes_drops_as_many_oldest_as_needed(path):
    size = len(encode(record(1, 1000)))
    with Outbox(path, max_records=1000, max_bytes=size * 4) as box:
        assert put(box, 1, 2, 3, 4, size=1000) == 0
        assert box.put("big", record(5, 2500)) == 3  # needs the room of three small ones
        assert trace_ids(box.claim(10)) == ["t4", "big"]
        assert box.stats()["pending_bytes"] <= size * 4
        assert box.stats()["dropped"] == 3


def test_a_record_bigger_than_the_whole_outbox_is_dropped_itself(path):
    with Outbox(path, max_records=10, max_bytes=500) as box:
        assert box.put("huge", record(1, 10_000)) == 1
        assert box.stats()["pending"] == 0 and box.stats()["dropped"] == 1


def test_claimed_records_are_not_dropped(path):
    with Outbox(path, max_records=2, max_bytes=10**9) as box:
        put(box, 1, 2)
        in_flight = box.claim(1)
        assert box.put("t3", record(3)) == 1
        box.release()
        assert trace_ids(box.claim(10)) == ["t1", "t3"]
        assert trace_ids(in_flight) == ["t1"]


def test_file_and_its_wal_and_shm_are_private(path):
    old = os.umask(0o000)  # even with a permissive umask
    try:
        with Outbox(path) as box:
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
    Outbox(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_wal_and_normal_sync(path):
    with Outbox(path):
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_everything_survives_a_reopen(path):
    with Outbox(path) as box:
        put(box, 1, 2, 3, 4)
        rows = box.claim(10)
        box.settle(delivered=[rows[0][0]], retry=[(rows[1][0], time.time() + 3600, "HTTP 500")],
                   dead=[(rows[2][0], 400, "bad")])
    with Outbox(path) as box:
        stats = box.stats()
        assert (stats["pending"], stats["delivered"], stats["retried"], stats["dead_lettered"]) == (2, 1, 1, 1)
        assert trace_ids(box.claim(10)) == ["t4"]  # t2 waits for its retry time...
        box.make_due()                              # ...until a new run makes it due
        assert trace_ids(box.claim(10)) == ["t2"]


def test_records_survive_kill_9(path):
    code = (
        "import os, sys; from r4u_mitm.outbox import Outbox\n"
        f"box = Outbox({str(path)!r})\n"
        "for i in range(50): box.put(f't{i}', {'metadata': {'trace_id': f't{i}'}, 'n': i})\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -9
    with Outbox(path) as box:
        assert len(box.claim(100)) == 50


def test_closed_outbox_says_so(path):
    box = Outbox(path)
    box.close()
    box.close()  # twice is fine
    with pytest.raises(OutboxClosed):
        box.put("t1", record(1))


def test_read_stats_reads_without_creating_anything(path, tmp_path, monkeypatch):
    now = [1_700_000_000.0]  # the outbox's wall clock, set by the test
    monkeypatch.setattr(outbox_module, "time", SimpleNamespace(time=lambda: now[0]))
    with Outbox(path) as box:
        put(box, 1)
        now[0] += 10
        put(box, 2)
        box.settle(delivered=[box.claim(1)[0][0]])
        now[0] += 2.5
        live = read_stats(path)  # while the outbox is open (a proxy running)
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
        Outbox(path, max_records=0)


def test_a_file_that_is_not_an_outbox_says_so(tmp_path):
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(OutboxError, match=r"is not an r4u-mitm outbox \(not a SQLite database\)$"):
        Outbox(path)
    assert path.read_bytes() == b"this is not a database at all" * 100


def test_someone_elses_database_is_left_alone(tmp_path):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE pending (x)")
    before = path.read_bytes()
    with pytest.raises(OutboxError, match=r"is not an r4u-mitm outbox \(a SQLite database of something else\)$"):
        Outbox(path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["app.db"]  # not even a -wal file


def test_a_place_that_cannot_be_written_says_so(tmp_path):
    with pytest.raises(OutboxError, match="^cannot create /proc/r4u/outbox.sqlite: No such file or directory$") as err:
        Outbox("/proc/r4u/outbox.sqlite")
    assert isinstance(err.value.__cause__, OSError)
