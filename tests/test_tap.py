from r4u_mitm.proxy.tap import Budget, Tap


def test_passes_every_piece_unchanged_and_keeps_it_with_its_time():
    ticks = iter(range(1, 100))
    tap = Tap(limit=1000, clock=lambda: next(ticks))
    pieces = [b"data: a\n", b"\n", b"data: [DONE]\n\n"]
    assert [tap(p) is p for p in pieces] == [True, True, True]
    assert tap(b"") == b""
    assert tap.pieces == pieces
    assert tap.times.tolist() == [1, 2, 3]
    assert tap.ended_at == 4
    assert tap.wire_bytes == tap.kept_bytes == sum(map(len, pieces))
    assert not tap.truncated


def test_beyond_the_limit_pieces_pass_but_are_not_kept():
    tap = Tap(limit=10)
    out = [tap(b"x" * 6) for _ in range(4)]
    assert out == [b"x" * 6] * 4
    assert tap.pieces == [b"x" * 6] * 2  # the piece that crosses the limit is kept whole
    assert tap.wire_bytes == 24 and tap.truncated


def test_a_failing_clock_never_breaks_the_pass_through():
    def broken():
        raise RuntimeError("injected")

    tap = Tap(limit=100, clock=broken)
    assert tap(b"data: a\n\n") == b"data: a\n\n"
    assert tap(b"") == b""
    assert tap.pieces == tap.times.tolist() == []  # pieces and times stay paired


def test_open_taps_share_one_memory_budget_released_by_the_writer():
    budget = Budget(limit=10)
    first, second = Tap(limit=100, budget=budget), Tap(limit=100, budget=budget)
    assert first(b"x" * 8) == b"x" * 8
    assert second(b"y" * 8) == b"y" * 8  # kept: the budget was not used up yet
    assert second(b"z" * 4) == b"z" * 4  # beyond it: passed on, not kept
    assert second.pieces == [b"y" * 8] and second.truncated and not first.truncated
    assert budget.used == 16
    budget.released += 16  # the spool writer stored both exchanges
    assert first(b"w" * 4) == b"w" * 4 and first.pieces[-1] == b"w" * 4
