from r4u_mitm.tap import Tap


def test_passes_every_piece_unchanged_and_keeps_it_with_its_time():
    ticks = iter(range(1, 100))
    tap = Tap(limit=1000, clock=lambda: next(ticks))
    pieces = [b"data: a\n", b"\n", b"data: [DONE]\n\n"]
    assert [tap(p) is p for p in pieces] == [True, True, True]
    assert tap(b"") == b""
    assert tap.pieces == pieces
    assert tap.times == [1, 2, 3]
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
    assert tap.pieces == tap.times == []  # pieces and times stay paired
