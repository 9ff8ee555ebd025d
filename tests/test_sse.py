"""SSEDecoder against the WHATWG event-stream rules (facts §5) and the example streams."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r4u_mitm.pure.sse import Event, SSEDecoder
from tests.harness import STREAMS

FRAMING = STREAMS / "framing"
ALL_STREAMS = sorted(STREAMS.rglob("*.sse"))
EXPECTED = json.loads((FRAMING / "EXPECTED.json").read_text(encoding="utf-8"))


def _variants() -> dict[str, bytes]:
    """Every example stream, plus CRLF and CR-only versions of the LF ones with several lines per
    event (where an LF taken for a second line ending would split an event)."""
    cases = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in ALL_STREAMS}
    for name in ["framing/multiline_data.sse", "openai_responses/text.sse", "anthropic/text.sse"]:
        raw = cases[name]
        assert b"\r" not in raw
        cases[f"{name}+crlf"] = raw.replace(b"\n", b"\r\n")
        cases[f"{name}+cr"] = raw.replace(b"\n", b"\r")
    return cases


CASES = _variants()


def decode(*pieces: bytes) -> list[Event]:
    d = SSEDecoder()
    events = [e for p in pieces for e in d.feed(p)]
    return events + d.finish()


def decode_pieces(raw: bytes, cuts: list[int]) -> tuple[list[Event], bool]:
    d = SSEDecoder()
    bounds = [0, *sorted(cuts), len(raw)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in d.feed(raw[a:b])]
    events += d.finish()
    return events, d.pending


def awkward_cuts(raw: bytes) -> list[int]:
    """Cut points that matter: between CR and LF, inside UTF-8 sequences and the BOM."""
    return [i for i in range(1, len(raw)) if raw[i - 1] == 0x0D or 0x80 <= raw[i] <= 0xBF]


def test_example_streams_are_there():
    assert len(ALL_STREAMS) >= 30
    assert set(EXPECTED) == {p.name for p in FRAMING.glob("*.sse")}


# -- the oracle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_framing_against_expected(name):
    events = decode((FRAMING / name).read_bytes())
    assert [{"event": e.event, "data": e.data, "id": e.id} for e in events] == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_framing_one_byte_pieces(name):
    raw = (FRAMING / name).read_bytes()
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == decode(raw)


def test_unterminated_tail_sets_pending():
    d = SSEDecoder()
    assert [e.data for e in d.feed((FRAMING / "unterminated_tail.sse").read_bytes())]
    assert d.finish() == []
    assert d.pending is True


def test_multiline_fields():
    first = decode((FRAMING / "multiline_data.sse").read_bytes())[0]
    assert first.retry == 1500
    assert first.event == "content_block_delta"


def test_example_streams_parse_as_json():
    """Every provider stream is one JSON payload per event (plus chat's [DONE])."""
    for path in ALL_STREAMS:
        if path.parent.name == "framing":
            continue
        events = decode(path.read_bytes())
        assert events, path
        for e in events:
            if e.data != "[DONE]":
                json.loads(e.data)


# -- any split gives the same events ----------------------------------------------------------------


def test_variants_decode_like_the_originals():
    for name, raw in CASES.items():
        if "+" in name:
            assert decode(raw) == decode(CASES[name.split("+")[0]]), name


@pytest.mark.parametrize("name", CASES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_split_same_events(name, data):
    raw = CASES[name]
    whole, whole_pending = decode_pieces(raw, [])
    special = awkward_cuts(raw) or [0]
    cut = st.one_of(st.integers(0, len(raw)), st.sampled_from(special))
    cuts = data.draw(st.lists(cut, max_size=60))
    assert decode_pieces(raw, cuts) == (whole, whole_pending)


@pytest.mark.parametrize("name", CASES)
def test_one_byte_pieces_and_every_awkward_cut(name):
    raw = CASES[name]
    whole = decode_pieces(raw, [])
    assert decode_pieces(raw, list(range(1, len(raw)))) == whole
    assert decode_pieces(raw, awkward_cuts(raw)) == whole


# -- targeted rules ------------------------------------------------------------------------------


def test_bom_split_across_pieces():
    assert decode(b"\xef", b"\xbb", b"\xbfdata: x\n\n") == [Event(data="x")]
    assert decode(b"\xef\xbb", b"\xbf", b"data: x\n\n") == [Event(data="x")]


def test_only_one_leading_bom_is_stripped():
    # The second BOM is part of the field name "\ufeffdata": an unknown field.
    assert decode(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []
    assert decode(b"data: \xef\xbb\xbfx\n\n") == [Event(data="\ufeffx")]


def test_cr_at_piece_end_then_lf_is_one_line_ending():
    # Were the LF a second ending, the blank line would dispatch "a" and "b" apart.
    assert decode(b"data: a\r", b"\ndata: b\r\n\r\n") == [Event(data="a\nb")]
    assert decode(b"data: a\r", b"", b"\n", b"data: b\r", b"\n\r", b"\n") == [Event(data="a\nb")]


def test_cr_then_text_then_lf():
    # CR at a piece end, then a piece whose text is not an LF: the CR ended the line alone.
    assert decode(b"data: a\r", b"\xe6", b"\x97\xa5: x\n\n") == [Event(data="a")]  # "日" unknown field
    assert decode(b"data: a\r", b"\xe6", b"\ndata: b\n\n") == [Event(data="a\nb")]  # U+FFFD line
    assert decode(b"data: a\r", b"data: b\r\r") == [Event(data="a\nb")]


def test_line_endings():
    assert decode(b"data: a\rdata: b\r\r") == [Event(data="a\nb")]
    assert decode(b"data: a\r\ndata: b\n\r\n") == [Event(data="a\nb")]
    assert decode(b"data: a\n\rdata: b\r\n\n") == [Event(data="a"), Event(data="b")]


def test_only_cr_and_lf_end_lines():
    # str.splitlines would split on all of these.
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    assert decode(f"data: {odd}\n\n".encode()) == [Event(data=odd)]


def test_invalid_utf8_becomes_replacement_character():
    assert decode(b"data: \xff\xfex\n\n") == [Event(data="\ufffd\ufffdx")]
    # an incomplete sequence cut by a line ending
    assert decode(b"data: \xe6\x97\n\n") == [Event(data="\ufffd")]
    assert decode(b"data: \xe6", b"\x97", b"\n\n") == [Event(data="\ufffd")]


def test_utf8_sequence_split_across_pieces():
    raw = "data: 日本語 🙂\n\n".encode()
    assert decode(*(raw[i : i + 1] for i in range(len(raw)))) == [Event(data="日本語 🙂")]


def test_comments_are_ignored():
    assert decode(b": keep-alive\n\n:data: x\n\ndata: y\n: inside\n\n") == [Event(data="y")]


def test_one_leading_space_is_removed():
    assert decode(b"data:x\n\ndata: x\n\ndata:  x\n\n") == [
        Event(data="x"),
        Event(data="x"),
        Event(data=" x"),
    ]
    assert decode(b"event:  e\ndata:x \n\n") == [Event(event=" e", data="x ")]


def test_line_without_colon_is_a_field_with_empty_value():
    assert decode(b"data\n\n") == [Event(data="")]
    assert decode(b"data\ndata\n\n") == [Event(data="\n")]


def test_field_names_are_case_sensitive_and_unknown_ones_ignored():
    assert decode(b"Data: x\nEVENT: e\nfoo: bar\ndata: y\n\n") == [Event(data="y")]


def test_multiline_data_joins_with_lf():
    assert decode(b"data: a\ndata:\ndata: c\n\n") == [Event(data="a\n\nc")]


def test_empty_data_buffer_dispatches_nothing():
    assert decode(b"event: ping\n\n") == []
    assert decode(b"id: 1\n\n\n\n") == []
    assert decode(b"retry: 5\n\n") == []
    assert decode(b"\n\n\n") == []


def test_data_empty_string_is_still_dispatched():
    assert decode(b"data:\n\n") == [Event(data="")]


def test_event_type_default_and_reset():
    assert decode(b"event: a\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n") == [
        Event(event="a", data="1"),
        Event(event="message", data="2"),
        Event(event="message", data="3"),
    ]


def test_event_type_of_an_empty_event_does_not_leak():
    assert decode(b"event: ping\n\ndata: x\n\n") == [Event(data="x")]


def test_id_persists_and_empty_id_resets():
    raw = b"id: 5\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 6\n\ndata: d\n\nid:\ndata: e\n\n"
    assert [e.id for e in decode(raw)] == ["5", "5", "", "6", ""]


def test_id_with_nul_is_ignored():
    raw = b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"
    assert decode(raw) == [Event(data="a", id="1"), Event(data="b", id="1")]


def test_retry_only_when_all_ascii_digits():
    def retry(value: bytes):
        return decode(b"retry:" + value + b"\ndata: x\n\n")[0].retry

    assert retry(b" 3000") == 3000
    assert retry(b"0") == 0
    for bad in (b" +15", b" -1", b" 1.5", b" ", b"", b" 15 ", b"  15", b" \xd9\xa3", b" \xc2\xb2", b" 1e3"):
        assert retry(bad) is None, bad


def test_retry_belongs_to_its_event():
    assert [e.retry for e in decode(b"retry: 10\ndata: a\n\ndata: b\n\n")] == [10, None]


def test_pending_flag():
    d = SSEDecoder()
    d.feed(b"data: a\n\n")
    assert d.finish() == [] and d.pending is False

    d = SSEDecoder()
    assert d.feed(b"data: a\n\ndata: b") == [Event(data="a")]
    assert d.finish() == [] and d.pending is True  # partial line

    d = SSEDecoder()
    d.feed(b"data: a\n\ndata: b\n")
    assert d.finish() == [] and d.pending is True  # event not closed by a blank line

    d = SSEDecoder()
    d.feed(b"data: a\n\n: ping\n")
    assert d.finish() == [] and d.pending is False  # a complete comment is nothing

    d = SSEDecoder()
    d.feed(b"data: a\n\n\xe6\x97")
    assert d.finish() == [] and d.pending is True  # incomplete UTF-8 at EOF

    d = SSEDecoder()
    assert d.finish() == [] and d.pending is False


def test_unterminated_event_discarded_at_eof():
    assert decode(b"data: a\n\ndata: b\n") == [Event(data="a")]
    assert decode(b"data: a\n\ndata: b") == [Event(data="a")]


def test_events_come_out_as_soon_as_their_blank_line_arrives():
    d = SSEDecoder()
    assert d.feed(b"data: a\n") == []
    assert d.feed(b"\n") == [Event(data="a")]
    assert d.feed(b"data: b\n\ndata: c\n\nda") == [Event(data="b"), Event(data="c")]
    assert d.feed(b"ta: d\r") == []
    assert d.feed(b"\r") == [Event(data="d")]


def test_accepts_bytearray_and_memoryview():
    assert decode(bytearray(b"data: a\n\n"), memoryview(b"data: b\n\n")) == [Event(data="a"), Event(data="b")]


def test_long_line_in_one_byte_pieces():
    """2 MB line fed a byte at a time: fragments are joined once (quadratic joins would take
    minutes here; the throughput itself is measured outside the test suite)."""
    payload = b"x" * (2 * 1024 * 1024)
    raw = b"data: " + payload + b"\r\n\r\n"
    d = SSEDecoder()
    events = []
    for i in range(len(raw)):
        events += d.feed(raw[i : i + 1])
    assert d.finish() == [] and d.pending is False
    assert len(events) == 1 and len(events[0].data) == len(payload)
