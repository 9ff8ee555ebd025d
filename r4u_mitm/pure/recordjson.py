"""A record as the bytes that are stored and sent: compact JSON in UTF-8, big strings escaped in
slices. Pure.

``json.dumps`` of a record holding a 30 MB response escapes the whole string in one call (a
quarter of a second holding the GIL) and builds the JSON text (up to 4 bytes a character in
memory) before its UTF-8 bytes: several times the body at the peak. Here each big top-level
string (the request and the response) is escaped ``SLICE`` characters at a time, each slice
straight to bytes. Escaping is per character (a character outside the BMP is one character of a
``str``, a lone surrogate another), so slices cut anywhere splice into the same bytes as the
whole.

A big body needs no ``str`` at all: ``record.py`` keeps its UTF-8 bytes as a ``Utf8Text``, and
each slice of them is decoded, escaped and encoded on its own (``SLICE`` bytes, cut before a
byte that cannot continue a UTF-8 sequence, so that even invalid UTF-8 decodes slice by slice
to what the whole decodes to). A long string, and each slice, is escaped from its UTF-8 bytes
(``_utf8_string``): half the cost of escaping the text. ``Streamed`` goes further: a big record's size is measured first,
and its bytes are made as they are sent, never all at once.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

SLICE = 256 * 1024  # characters (bytes of a Utf8Text) escaped per call: about a millisecond
LONG = 16 * 1024  # characters of a string from which it is escaped on its own, from its UTF-8 bytes

# What JSON escaping adds to each byte of valid UTF-8 (``ensure_ascii=False``): one byte for
# `"`, `\` and the controls with a short escape, five for the other controls (`\u00XX`).
_EXTRA = bytes(0 if b >= 0x20 and b not in b'"\\' else 1 if b in b'"\\\b\t\n\f\r' else 5 for b in range(256))


@dataclass(frozen=True, slots=True, repr=False)
class Utf8Text:
    """A text kept as the UTF-8 bytes it is read from (invalid sequences read as U+FFFD, as
    ``errors="replace"`` does): a big body in a record, never one ``str`` (up to 4 bytes a
    character). ``str()`` of it is that text."""

    data: bytes

    def __str__(self) -> str:
        return self.data.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Utf8Text(<{len(self.data)} bytes>)"


def encode_record(record: dict) -> bytes:
    """``json.dumps(record, separators=(",", ":"), ensure_ascii=False)`` in UTF-8, byte for
    byte, a ``Utf8Text`` written as its text; with a lone surrogate anywhere (not UTF-8), the
    ``ensure_ascii=True`` form, which escapes it and stays faithful."""
    try:
        return _encode(record, False)
    except UnicodeEncodeError:
        return _encode(record, True)


def is_big(record: dict) -> bool:
    """Whether the record holds a string encoded in slices (else one ``json.dumps`` does it)."""
    return record.__class__ is dict and any(_big(value) for value in record.values())


class Streamed:
    """A big record's bytes as ``encode_record`` gives them, made slice by slice each time it is
    iterated (as they are sent): never all in memory. Its size is measured first, without
    keeping any: from the bytes where a slice is valid UTF-8 (its length plus what escaping
    adds), else by encoding the slice."""

    __slots__ = ("record", "ascii", "size")

    def __init__(self, record: dict) -> None:
        self.record = record
        self.ascii = False
        try:
            self.size = sum(map(_size, _layout(record, False)))
        except UnicodeEncodeError:
            self.ascii = True
            self.size = sum(map(_size, _layout(record, True)))

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[bytes]:
        for part in _layout(self.record, self.ascii):
            if part.__class__ is bytes:
                yield part
            else:
                yield from _slices(*part)


def _big(value) -> bool:
    return value.__class__ is Utf8Text or (value.__class__ is str and len(value) > SLICE)


def _encode(record: dict, ascii: bool) -> bytes:
    if not is_big(record) and (ascii or not _has_long(record)):
        return _dumps(record, ascii)  # one call is quicker
    # BytesIO grows one buffer (realloc: mostly in place) and hands it over without a copy: the
    # peak is the output plus an eighth and a slice, where a join of the parts would double it.
    out = io.BytesIO()
    for part in _layout(record, ascii):
        if part.__class__ is bytes:
            out.write(part)
        else:
            for piece in _slices(*part):
                out.write(piece)
    return out.getvalue()


def _layout(record: dict, ascii: bool) -> Iterator[bytes | tuple]:
    """The record's bytes, except each big string, given as ``(value, ascii)`` for `_slices`;
    a long one is escaped from its UTF-8 (`_utf8_string`), the members between in one call."""
    if not all(key.__class__ is str for key in record):
        yield _dumps(record, ascii)  # json.dumps turns other keys into strings its own way
        return
    separator = b"{"
    run: dict = {}  # members written as one json.dumps does them
    for key, value in record.items():
        big = _big(value)
        if not big and (ascii or value.__class__ is not str or len(value) <= LONG):
            run[key] = value
            continue
        if run:
            yield separator + _dumps(run, ascii)[1:-1]
            separator, run = b",", {}
        head = separator + _dumps(key, ascii) + b":"
        separator = b","
        if big:
            yield head + b'"'
            yield value, ascii
            separator = b'",'  # its closing quote, with what follows
        else:
            yield head + _utf8_string(value.encode("utf-8"))  # raises on a lone surrogate
    if run:
        yield separator + _dumps(run, ascii)[1:-1]
        separator = b","
    yield b'"}' if separator == b'",' else b"}"


def _slices(value: str | Utf8Text, ascii: bool) -> Iterator[bytes]:
    """The JSON string of a big value, escaped slice by slice, without its quotes."""
    if value.__class__ is str:
        for i in range(0, len(value), SLICE):
            piece = value[i:i + SLICE]
            yield _dumps(piece, True)[1:-1] if ascii else _utf8_string(piece.encode("utf-8"))[1:-1]
        return
    for piece in _utf8_slices(value.data):
        if not ascii and _valid(piece):
            yield _utf8_string(piece)[1:-1]
        else:
            yield _dumps(piece.decode("utf-8", "replace"), ascii)[1:-1]


def _size(part: bytes | tuple) -> int:
    """The length of a part of the layout as it is sent."""
    if part.__class__ is bytes:
        return len(part)
    value, ascii = part
    if value.__class__ is str or ascii:
        return sum(map(len, _slices(value, ascii)))
    total = 0
    for piece in _utf8_slices(value.data):
        if not piece.isascii() and not _valid(piece):  # (valid: decoding with replace gives these bytes back)
            total += len(_dumps(piece.decode("utf-8", "replace"), False)) - 2
            continue
        escapes = piece.translate(_EXTRA)
        total += len(piece) + escapes.count(1) + 5 * escapes.count(5)
    return total


def _utf8_slices(data: bytes) -> Iterator[bytes]:
    """``data`` in slices of about ``SLICE`` bytes that each decode (``errors="replace"``) to
    their part of what the whole decodes to. A slice ends before a byte that is not a
    continuation byte (0x80-0xBF), where no sequence, valid or not, goes on; or after three
    continuation bytes, where none does either (a sequence is at most four bytes long, and a
    continuation byte begins none)."""
    start = 0
    while start < len(data):
        cut = start + SLICE
        for _ in range(3):
            if cut >= len(data) or data[cut] & 0xC0 != 0x80:
                break
            cut += 1
        yield data[start:cut]
        start = cut


def _has_long(record: dict) -> bool:
    return record.__class__ is dict and any(
        value.__class__ is str and len(value) > LONG for value in record.values())


def _valid(data: bytes) -> bool:
    """Whether ``data`` is UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _utf8_string(data: bytes) -> bytes:
    """The JSON string (``ensure_ascii=False``) of the text whose UTF-8 is ``data``, in UTF-8,
    made from the bytes: read as Latin-1 (one character a byte, the cheapest ``str``), escaped
    by json (which escapes only `"`, `\\` and the controls below U+0020, all ASCII, and leaves
    every byte of a multi-byte sequence, all 0x80 and above, as it is) and written back a byte a
    character. Half the cost of escaping the text itself and encoding the result, which is as
    wide as the text's widest character (4 bytes each with one emoji). ``data`` must be valid
    UTF-8 (otherwise its bytes would go as they are)."""
    return json.dumps(data.decode("latin-1"), ensure_ascii=False).encode("latin-1")


# json.dumps with arguments makes an encoder each call: a few µs, a record's layout makes dozens
_ENCODE = {ascii: json.JSONEncoder(separators=(",", ":"), ensure_ascii=ascii).encode for ascii in (False, True)}


def _dumps(value, ascii: bool) -> bytes:
    text = _ENCODE[ascii](value)
    return text.encode("ascii") if ascii else text.encode("utf-8")  # raises on a lone surrogate
