"""recordjson.encode_record and Streamed: byte for byte what one json.dumps of the record gives (a
Utf8Text as its text), built in slices."""

from __future__ import annotations

import json
import tracemalloc
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r4u_mitm.delivery import deliver
from r4u_mitm.pure import recordjson
from r4u_mitm.pure.record import Exchange, build_record
from r4u_mitm.pure.recordjson import Streamed, Utf8Text, encode_record
from r4u_mitm.spool import Row, pack
from tests.harness import STREAMS


def reference(record) -> bytes:
    """How records were encoded before: one json.dumps, ASCII escapes when not UTF-8; a body kept
    as bytes was a str decoded with errors="replace"."""
    if isinstance(record, dict):
        record = {k: str(v) if isinstance(v, Utf8Text) else v for k, v in record.items()}
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode("ascii")


TEXTS = [
    "", "plain", "é", "日本語", "😀 outside the BMP", "\ud83d\ude00 a pair of surrogate code points",
    "a lone \ud800", "\udfff", "controls \x00\x01\x1f\x7f \n\r\t \"quoted\" \\ / \b\f", "\u2028\u2029",
    "\ufeff", "x" * 300,
]


@pytest.mark.parametrize("long", [0, 5, recordjson.LONG])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, recordjson.SLICE])
@pytest.mark.parametrize("text", TEXTS)
def test_slices_splice_into_the_same_bytes(size, text, long):
    record = {"request": text * 5, "response": "é😀" + text * 11, "metadata": {"model": text, "n": [1, 2.5]},
              "error": None}
    with mock.patch.object(recordjson, "SLICE", size), mock.patch.object(recordjson, "LONG", long):
        assert encode_record(record) == reference(record)


@pytest.mark.parametrize("record", [{}, {"a": 1}, {1: "x" * 50, "b": "y" * 50}, {None: 1, True: 2, 1.5: 3},
                                    [1, "x" * 50], "x" * 50, {"nan": float("nan"), "inf": float("-inf")}])
def test_other_shapes(record):
    with mock.patch.object(recordjson, "SLICE", 3):
        assert encode_record(record) == reference(record)


def test_outbox_encodes_with_it():
    record = {"response": "a lone \ud800 " * 100, "metadata": {}}
    with mock.patch.object(recordjson, "SLICE", 7):
        assert encode_record(record) == reference(record)
    assert b"\\ud800" in encode_record(record)


@pytest.mark.parametrize("name", ["openai_chat/basic.sse", "framing/invalid_utf8.sse", "anthropic/thinking.sse"])
def test_real_records(name):
    raw = (STREAMS / name).read_bytes()
    ex = Exchange(trace_id="t", provider="openai", url="https://api.openai.com/v1/chat/completions", method="POST",
                  path="/v1/chat/completions", request_headers=[("content-type", "application/json")],
                  request_body='{"q":"😀 é \ud800"}'.encode("utf-8", "surrogatepass"), started_wall=1.7e9,
                  started=1.0, ended=2.0, status_code=200, stream=True, pieces=[raw], piece_times=[1.5],
                  response_headers=[("content-type", "text/event-stream")])
    record = build_record(ex, max_body_bytes=1 << 20)
    for size in (5, 100, recordjson.SLICE):
        with mock.patch.object(recordjson, "SLICE", size):
            assert encode_record(record) == reference(record)


def test_a_big_record_peaks_at_about_its_bytes():
    record = {"request": "{}", "response": ("é😀 token " * 100 + "\n") * 20_000, "metadata": {"events": 1}}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        blob = encode_record(record)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(blob) > 20_000_000
    assert peak < 1.5 * len(blob)  # one json.dumps of it: the text (4 bytes a character), then its bytes
    assert blob == reference(record)


characters = st.characters(exclude_categories=())  # surrogates too
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(characters) | st.sampled_from(TEXTS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(characters, max_size=5), children,
                                                                        max_size=4),
    max_leaves=12,
)
records = st.dictionaries(st.text(characters, max_size=8) | st.sampled_from(["request", "response"]),
                          values | st.text(characters, min_size=10, max_size=200), max_size=8)


@settings(max_examples=400, deadline=None)
@given(record=records | st.dictionaries(st.integers() | st.none(), values, max_size=3), size=st.integers(1, 20),
       long=st.integers(0, 30))
def test_any_record_same_bytes(record, size, long):
    with mock.patch.object(recordjson, "SLICE", size), mock.patch.object(recordjson, "LONG", long):
        assert encode_record(record) == reference(record)


# A long string escaped from its UTF-8 bytes (read as Latin-1) ----------------------------------------

escaped_texts = st.text(st.characters(exclude_categories=()) | st.sampled_from(
    ['"', "\\", "\n", "\r", "\t", "\b", "\f", "\x00", "\x1f", "\x7f", "\x80", "\xff", "\u2028", "\u2029",
     "\ufeff", "\U0001f600", "\ud800", "\udfff"]))


@settings(max_examples=1000, deadline=None)
@given(text=escaped_texts)
def test_a_string_escaped_from_its_bytes_is_what_json_dumps_gives(text):
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the record goes as ensure_ascii=True
        record = {"request": "{}", "response": text, "error": None}
        with mock.patch.object(recordjson, "LONG", 0):
            assert encode_record(record) == reference(record)
            assert encode_record(record) == json.dumps(record, separators=(",", ":")).encode("ascii")
        return
    assert recordjson._utf8_string(data) == json.dumps(text, ensure_ascii=False).encode("utf-8")


# Utf8Text: a big body kept as its UTF-8 bytes, valid or not ----------------------------------------

# Sequences that test the cuts: valid ones of each length, each kind of invalid one (a lone
# continuation, an overlong or surrogate lead, a sequence cut short, bytes that are never UTF-8),
# what JSON escapes, and a BOM.
SEQUENCES = [b"a", b'"', b"\\", b"\n", b"\r\n", b"\x00", b"\x1f", b"\x7f", "\u00e9".encode(), "\u65e5".encode(),
             "\U0001f600".encode(), "\u2028".encode(), b"\x80", b"\xbf", b"\xc0\xaf", b"\xc2", b"\xe0\x80", b"\xe0\xa0",
             b"\xed\xa0\x80", b"\xf0", b"\xf0\x90", b"\xf0\x90\x80", b"\xf4\x90\x80\x80", b"\xf5", b"\xff",
             b"\xef\xbb\xbf"]
bodies = st.lists(st.sampled_from(SEQUENCES), max_size=40).map(b"".join) | st.binary(max_size=60)


def check_streamed(record: dict) -> None:
    """Streamed gives what encode_record gives (its size first), and that is the reference."""
    expected = reference(record)
    assert encode_record(record) == expected
    streamed = Streamed(record)
    assert len(streamed) == len(expected) and b"".join(streamed) == expected
    assert b"".join(streamed) == expected  # made again on each iteration (a post tried again)


@settings(max_examples=600, deadline=None)
@given(data=bodies, size=st.integers(1, 9), other=st.sampled_from(["", "é😀", "a lone \ud800"]))
def test_utf8_text_in_slices_is_its_text(data, size, other):
    record = {"request": Utf8Text(data[::-1]), "response": Utf8Text(data), "metadata": {"note": other}}
    with mock.patch.object(recordjson, "SLICE", size):
        check_streamed(record)


@pytest.mark.parametrize("name", ["openai_chat/basic.sse", "framing/invalid_utf8.sse", "framing/split_utf8.sse"])
def test_utf8_text_of_real_streams(name):
    data = (STREAMS / name).read_bytes() * 3
    for size in (1, 4, 1000, recordjson.SLICE):
        with mock.patch.object(recordjson, "SLICE", size):
            check_streamed({"request": "{}", "response": Utf8Text(data), "error": None})


def test_a_record_without_big_strings_streams_too():
    check_streamed({"request": "{}", "response": "data: [DONE]\n\n", "metadata": {"events": 1}})


def stored_row(body: bytes) -> Row:
    """A stored streamed chat exchange, as a deliverer claims it."""
    pieces = [body[i:i + 300] for i in range(0, len(body), 300)]
    ex = Exchange(trace_id="t", provider="openai", url="https://api.openai.com/v1/chat/completions", method="POST",
                  path="/v1/chat/completions", request_headers=[("content-type", "application/json")],
                  request_body=b'{"stream":true}', started_wall=1.7e9, started=1.0, ended=2.0, status_code=200,
                  response_headers=[("content-type", "text/event-stream")], stream=True, pieces=pieces,
                  piece_times=[1.5] * len(pieces), wire_bytes=len(body))
    return Row(1, "t", 0, 0, *pack(ex, {"max_body_bytes": 1 << 30, "redact": []})[1:])


def peak(fn) -> int:
    """Bytes allocated at the peak of `fn()` (Python's allocations, traced) above before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_a_big_stored_record_peaks_at_about_its_body_and_its_bytes():
    """A stored 8 MB stream of emoji and accented text (a str of it: 4 bytes a character) is
    built and encoded with no str of its body: its record's bytes (~1.1 times the body) and the
    pieces' ends and times at the peak, little more. Streamed, not even its bytes."""
    event = 'data: {"choices":[{"delta":{"content":"é😀 北京 \\"ok\\""}}],"model":"m"}\n\n'.encode()
    body = event * (8_000_000 // len(event))
    row = stored_row(body)
    size = len(deliver.build(row))
    assert peak(lambda: deliver.build(row)) < 2.5 * len(body)
    assert size > len(body)
    assert isinstance(deliver.content(row), Streamed)
    # the pieces' ends and times, and one slice's texts (up to 4 bytes a character) and bytes
    assert peak(lambda: sum(map(len, deliver.content(row)))) < 0.15 * len(body) + 16 * recordjson.SLICE
