"""A record as the bytes that are stored and sent: compact JSON in UTF-8, big strings escaped in
slices. Pure.

``json.dumps`` of a record holding a 30 MB response escapes the whole string in one call (a
quarter of a second holding the GIL) and builds the JSON text (up to 4 bytes a character in
memory) before its UTF-8 bytes: several times the body at the peak. Here each big top-level
string (the request and the response) is escaped ``SLICE`` characters at a time, each slice
straight to bytes, written to the output as it comes. Escaping is per character (a character
outside the BMP is one character of a ``str``, a lone surrogate another), so slices cut anywhere
splice into the same bytes as the whole.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

SLICE = 256 * 1024  # characters escaped per call: about a millisecond


def encode_record(record: dict) -> bytes:
    """``json.dumps(record, separators=(",", ":"), ensure_ascii=False)`` in UTF-8, byte for
    byte; with a lone surrogate anywhere (not UTF-8), the ``ensure_ascii=True`` form, which
    escapes it and stays faithful."""
    try:
        return _encode(record, False)
    except UnicodeEncodeError:
        return _encode(record, True)


def _encode(record: dict, ascii: bool) -> bytes:
    big = record.__class__ is dict and any(v.__class__ is str and len(v) > SLICE for v in record.values())
    if not big:
        return _dumps(record, ascii)  # one call is quicker
    # BytesIO grows one buffer (realloc: mostly in place) and hands it over without a copy: the
    # peak is the output plus an eighth and a slice, where a join of the parts would double it.
    out = io.BytesIO()
    for part in _parts(record, ascii):
        out.write(part)
    return out.getvalue()


def _parts(record: dict, ascii: bool) -> Iterator[bytes]:
    if not all(key.__class__ is str for key in record):
        yield _dumps(record, ascii)  # json.dumps turns other keys into strings its own way
        return
    separator = b"{"
    for key, value in record.items():
        yield separator + _dumps(key, ascii) + b":"
        separator = b","
        if value.__class__ is str and len(value) > SLICE:
            yield b'"'
            for i in range(0, len(value), SLICE):
                yield memoryview(_dumps(value[i:i + SLICE], ascii))[1:-1]  # without its quotes
            yield b'"'
        else:
            yield _dumps(value, ascii)
    yield b"}"


def _dumps(value, ascii: bool) -> bytes:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=ascii)
    return text.encode("ascii") if ascii else text.encode("utf-8")  # raises on a lone surrogate
