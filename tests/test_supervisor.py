"""The proxy's side of the spool, without mitmproxy: the writer thread (batches, bounds, a
failing disk, the memory budget) and a link's store-now path after stop."""

import logging
import re
import threading

from r4u_mitm.proxy import supervisor
from r4u_mitm.proxy.tap import Budget
from r4u_mitm.spool import Spool, read_stats
from tests.harness import wait_for
from tests.test_spool import OPTIONS, big_stream, exchange


def writer(path, budget=None, **bounds) -> tuple[supervisor.SpoolWriter, threading.Event]:
    stored = threading.Event()
    w = supervisor.SpoolWriter(path, max_records=bounds.get("max_records", 100),
                               max_bytes=bounds.get("max_bytes", 1 << 30), budget=budget or Budget(1 << 30),
                               on_stored=stored.set)
    return w, stored


def test_exchanges_are_stored_and_their_budget_released(tmp_path):
    budget = Budget(1 << 20)
    budget.kept = 3000
    w, stored = writer(tmp_path / "s.sqlite", budget)
    for i in range(3):
        w.append(exchange(f"t{i}", 10), OPTIONS, 1000)
    assert w.close(10)
    assert stored.is_set() and budget.used == 0
    assert read_stats(tmp_path / "s.sqlite")["pending"] == 3 and w.lost == 0


def test_exchanges_in_a_burst_share_one_transaction_and_one_wake_up(tmp_path, monkeypatch):
    """A lone exchange is stored on its own; one close behind the last batch waits for those
    that follow it, even those that come after the writer took it."""
    monkeypatch.setattr(supervisor, "BURST", 60.0)
    monkeypatch.setattr(supervisor, "GATHER", 0.5)
    wakes = []
    w = supervisor.SpoolWriter(tmp_path / "s.sqlite", max_records=100, max_bytes=1 << 30, budget=Budget(1 << 30),
                               on_stored=lambda: wakes.append(read_stats(tmp_path / "s.sqlite")["pending"]))
    w.append(exchange("t0"), OPTIONS)
    wait_for(lambda: wakes, what="the lone exchange stored")
    w.append(exchange("t1"), OPTIONS)
    wait_for(w._queue.empty, what="t1 taken by the writer")
    w.append(exchange("t2"), OPTIONS)
    assert w.close(10)
    assert wakes == [1, 3]


def test_a_stored_exchange_is_let_go_at_once_its_pieces_a_slice_at_a_time(tmp_path, monkeypatch):
    """Not when the next exchange comes: the writer empties the pieces and times it was handed
    (a slice at a time, the GIL to the event loop in between) as soon as they are stored."""
    monkeypatch.setattr(supervisor, "FREE_STEP", 7)
    w, stored = writer(tmp_path / "s.sqlite")
    ex = big_stream("t1", 100)
    pieces, times, body, n = ex.pieces, ex.piece_times, b"".join(ex.pieces), len(ex.pieces)
    w.append(ex, OPTIONS)
    wait_for(lambda: stored.is_set() and not pieces and not times, what="the pieces let go")
    with Spool(tmp_path / "s.sqlite") as box:
        (row,) = box.claim(1)
    assert row.response_body == body and len(row.piece_ends) == len(row.piece_times) == 8 * n
    assert w.close(10)


def test_a_full_spool_drops_the_oldest_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    w, _ = writer(tmp_path / "s.sqlite", max_records=5)
    for i in range(8):
        w.append(exchange(f"t{i}"), OPTIONS)
    assert w.close(10)
    assert read_stats(tmp_path / "s.sqlite")["dropped"] == 3
    said = [int(m) for m in re.findall(r"dropped the (\d+) oldest", caplog.text)]
    assert said and sum(said) <= 3  # summed between two lines, never silent


def test_a_spool_that_cannot_be_written_is_said_once_and_the_budget_released(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="r4u_mitm")
    bad = tmp_path / "s.sqlite"
    bad.write_bytes(b"not a database" * 100)
    budget = Budget(1 << 20)
    budget.kept = 500
    w, stored = writer(bad, budget)
    for i in range(5):
        w.append(exchange(f"t{i}"), OPTIONS, 100)
    assert w.close(10)
    assert w.lost == 5 and budget.used == 0 and not stored.is_set()
    lines = [r.getMessage() for r in caplog.records if "cannot store traces" in r.getMessage()]
    assert len(lines) == 1 and str(bad) in lines[0] and "the proxy goes on" in lines[0]


def test_after_stop_a_late_exchange_is_stored_at_once(tmp_path):
    link = supervisor.Link(tmp_path / "s.sqlite")  # never started, as after done()
    link.budget.kept = 10
    link.append(exchange("late"), OPTIONS, 10)
    assert read_stats(tmp_path / "s.sqlite")["pending"] == 1 and link.budget.used == 0


def test_a_link_is_one_per_spool_path(tmp_path):
    a = supervisor.link(tmp_path / "x" / ".." / "s.sqlite")
    assert supervisor.link(tmp_path / "s.sqlite") is a
    supervisor.forget(a)
    assert supervisor.link(tmp_path / "s.sqlite") is not a
