"""An exchange, as plain data, into the record R4U ingests (`POST /v1/http-traces`).

Runs once per exchange in the delivery process (`deliver.py`), never in the proxy: this is where
bodies are decoded, streams parsed and timings derived. Knows nothing of mitmproxy.
"""

from __future__ import annotations

import codecs
import io
import itertools
import logging
import re
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from r4u_mitm.pure import dialects, fastpath, hosts, openai_url, recordjson
from r4u_mitm.pure.encoding import BodyDecoder, decode_body, is_identity
from r4u_mitm.pure.recordjson import Utf8Text
from r4u_mitm.pure.redact import REDACTED, BodyRedactor, body_redactor, is_secret_header, redact_url
from r4u_mitm.pure.sse import SSEDecoder

GIL_YIELD_EVERY = 64  # pieces parsed between two voluntary releases of the GIL

log = logging.getLogger("r4u_mitm")
_parse_failures = itertools.count(1)

BINARY_TYPES = ("audio/", "image/", "video/", "multipart/", "application/octet-stream",
                "application/zip", "application/pdf")
TEXT_TYPES = ("text/", "json", "xml", "event-stream", "x-www-form-urlencoded", "javascript")
# Where a provider puts its id of an exchange, best first (Azure's gateway may send only its own
# `apim-request-id`); the others use `x-request-id`.
REQUEST_ID_HEADERS = {
    hosts.ANTHROPIC: ("request-id",),
    hosts.AZURE_OPENAI: ("x-request-id", "apim-request-id"),
}


class Pieces:
    """The pieces of a body kept whole: the body and where each piece ends in it. A stored
    stream (one blob, ~100k pieces in 30 MB) is read without a bytes object per piece; a piece
    is sliced when iterated."""

    __slots__ = ("body", "ends")

    def __init__(self, body: bytes, ends: Sequence[int]) -> None:
        self.body = body
        self.ends = ends

    def __len__(self) -> int:
        return len(self.ends)

    def __iter__(self) -> Iterator[bytes]:
        start = 0
        for end in self.ends:
            yield self.body[start:end]
            start = end

    def __eq__(self, other) -> bool:
        return isinstance(other, Pieces | list) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other))

    __hash__ = None


@dataclass(slots=True)
class Exchange:
    """One HTTP exchange, frozen when its flow ended. Times are monotonic seconds, except
    `started_wall` (wall clock at request start)."""

    trace_id: str
    provider: str
    url: str
    method: str
    path: str
    request_headers: list[tuple[str, str]]
    request_body: bytes | None
    started_wall: float
    started: float
    ended: float
    status_code: int = 0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    headers_at: float | None = None
    stream: bool = False
    pieces: list[bytes] | Pieces = field(default_factory=list)
    piece_times: Sequence[float] = field(default_factory=list)  # a tap's or a stored array('d'): indexed, iterated
    wire_bytes: int = 0
    truncated: bool = False
    transport_error: str | None = None
    properties: dict[str, str] = field(default_factory=dict)
    note: str | None = None


def build_record(ex: Exchange, *, max_body_bytes: int, redact: Iterable[str] = (),
                 redact_body_keys: Iterable[str] = (), openai_url_alias: bool = True) -> dict:
    """The R4U record for `ex`, per the ingestion contract (see docs/record.md). `redact`: more
    header names to redact; `redact_body_keys`: more JSON member names (see redact.py);
    `openai_url_alias`: an Azure or compatible host's URL goes as OpenAI's (see openai_url.py)."""
    extra = frozenset(name.lower() for name in redact)
    redactor = body_redactor(redact_body_keys, ex.path)
    req_type = _header(ex.request_headers, "content-type")
    resp_type = _header(ex.response_headers, "content-type")
    request_text, request_truncated, request_decode_error, request_utf8 = _body_text(
        ex.request_body or b"", _header(ex.request_headers, "content-encoding"), req_type, max_body_bytes
    )
    request_text = _redacted(redactor, request_text, request_utf8, stream=False)
    meta: dict = {
        "url": redact_url(ex.url),
        "provider": ex.provider,
        "trace_id": ex.trace_id,
        "stream": ex.stream,
        "stream_complete": None,
        "events": None,
        "ttfb_ms": _ms(ex.headers_at, ex.started),
        "ttft_ms": None,
        "duration_ms": _ms(ex.ended, ex.started),
        "response_bytes": ex.wire_bytes,
        "model": None,
        "finish_reason": None,
        "usage": None,
        "upstream_request_id": _request_id(ex),
    }
    if openai_url_alias:
        meta.update(openai_url.alias(ex.provider, ex.url) or {})
    encoding = _header(ex.response_headers, "content-encoding")
    parse_error = None
    summary = None
    if ex.stream:
        try:
            response_text, summary, ttft_at, truncated, decode_error, utf8 = _read_stream(
                ex, encoding, max_body_bytes)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not lose the trace
            parse_error = _parse_failed(ex, exc)
            response_text, truncated, decode_error, utf8 = _body_text(
                _joined(ex.pieces), encoding, resp_type, max_body_bytes
            )
        else:
            meta.update(events=summary.events, ttft_ms=_ms(ttft_at, ex.started), model=summary.model,
                        finish_reason=summary.finish_reason, usage=summary.usage)
            # A truncated trace saw only part of the stream: completeness is unknown, not false.
            meta["stream_complete"] = True if summary.complete else (
                None if truncated or ex.truncated else False)
        truncated = truncated or ex.truncated
        provider_error = summary.error if summary is not None else None
    else:
        response_text, truncated, decode_error, utf8 = _body_text(
            _joined(ex.pieces), encoding, resp_type, max_body_bytes
        )
        try:
            found = dialects.body_summary(ex.provider, ex.path, str(response_text))
        except Exception as exc:  # noqa: BLE001 - a parser bug must not lose the trace
            parse_error = _parse_failed(ex, exc)
            found = {}
        meta.update(model=found.get("model"), finish_reason=found.get("finish_reason"), usage=found.get("usage"))
        provider_error = found.get("error")
        truncated = truncated or ex.truncated
    response_text = _redacted(redactor, response_text, utf8, stream=ex.stream)
    if parse_error:
        meta["parse_error"] = parse_error
    if truncated:
        meta["truncated"] = True
    if decode_error:
        meta["decode_error"] = decode_error
    # The request's body is a body too: cut at the same limit, decoded the same way.
    if request_truncated:
        meta["truncated"] = True
    if request_decode_error:
        meta["decode_error"] = "; ".join(filter(None, (decode_error, f"request: {request_decode_error}")))
    if ex.properties:
        meta["properties"] = dict(ex.properties)
    return {
        "started_at": _iso(ex.started_wall),
        "completed_at": _iso(ex.started_wall + max(0.0, ex.ended - ex.started)),
        "status_code": ex.status_code,
        "request": request_text,  # decoded with errors="replace": never a lone surrogate
        "request_headers": redact_headers(ex.request_headers, extra),
        "response": response_text,
        "response_headers": redact_headers(ex.response_headers, extra),
        "error": _clean(_error(ex, summary, provider_error, truncated)),
        "path": None,
        "request_method": _clean(ex.method),
        "request_path": _clean(ex.path),
        "metadata": _clean(meta),
    }


def _request_id(ex: Exchange) -> str | None:
    """The provider's own id of the exchange, from the first of its headers that is there."""
    names = REQUEST_ID_HEADERS.get(ex.provider, ("x-request-id",))
    return next(filter(None, (_header(ex.response_headers, name) for name in names)), None)


def _parse_failed(ex: Exchange, exc: Exception) -> str:
    """Log a failure to read a response (a bug of ours, not the server's) with the trace id, and
    say where it happened, without any body bytes (the exception's message may quote them)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    what = f"{type(exc).__name__}{where}"
    n = next(_parse_failures)
    if n <= 10 or n % 1000 == 0:
        log.error("r4u-mitm: internal error reading the response of trace %s (%d so far; traced without "
                  "its summary): %s", ex.trace_id, n, what)
    return what


def _read_stream(ex: Exchange, encoding: str | None, limit: int):
    """Decode and parse a teed event stream piece by piece, timing the first output event by
    the arrival of the piece that completed it."""
    fast = _read_stream_fast(ex, encoding, limit)
    if fast is not None:
        return fast
    body = BodyDecoder(encoding, limit)
    decoder = SSEDecoder()
    summary = dialects.stream_summary(ex.provider, ex.path)
    # Without a content coding the decoded body is the raw one (cut at the limit): not copied.
    decoded = None if is_identity(encoding) else io.BytesIO()
    ttft_at: float | None = None
    times = ex.piece_times if len(ex.piece_times) == len(ex.pieces) else [None] * len(ex.pieces)
    for n, (piece, at) in enumerate(zip(ex.pieces, times), 1):
        if n % GIL_YIELD_EVERY == 0:
            time.sleep(0)  # let the deliverer's event loop (posts in flight) have the GIL: a long stream takes a while
        chunk = body.feed(piece)
        if chunk:
            if decoded is not None:
                decoded.write(chunk)
            for event in decoder.feed(chunk):
                if summary.add(event) and ttft_at is None:
                    ttft_at = at
    tail = body.finish()
    if tail:
        decoded.write(tail)  # (a pass-through has no tail)
    for event in [*decoder.feed(tail), *decoder.finish()]:
        if summary.add(event) and ttft_at is None and ex.piece_times:
            ttft_at = ex.ended
    data = decoded.getvalue() if decoded is not None else _joined(ex.pieces)[:limit]
    content_type = _header(ex.response_headers, "content-type")
    return _decoded(data, content_type), summary, ttft_at, body.truncated, body.error, _utf8(data, content_type)


def _read_stream_fast(ex: Exchange, encoding: str | None, limit: int):
    """The same as `_read_stream`, at C speed, for the usual chat stream (see fastpath.py);
    None when that does not apply."""
    if not fastpath.applies(ex.provider, ex.path, encoding):
        return None
    body = _joined(ex.pieces)
    times = ex.piece_times if len(ex.piece_times) == len(ex.pieces) else None
    ends = ex.pieces.ends if ex.pieces.__class__ is Pieces else itertools.accumulate(map(len, ex.pieces))
    found = fastpath.read_stream(ex.provider, ex.path, encoding, body, limit, ends, times)
    if found is None:
        return None
    summary, ttft_at = found
    truncated = len(body) > limit
    data = body[:limit] if truncated else body
    content_type = _header(ex.response_headers, "content-type")
    return _decoded(data, content_type), summary, ttft_at, truncated, None, _utf8(data, content_type)


def _joined(pieces: list[bytes] | Pieces) -> bytes:
    """The body the pieces make (a stored exchange's is one already: no copy)."""
    return pieces.body if pieces.__class__ is Pieces else b"".join(pieces)


def _body_text(raw: bytes, encoding: str | None, content_type: str | None, limit: int):
    """(text, truncated, decode_error, utf8) for a whole body: decoded from its Content-Encoding
    and charset; binary bodies become a short placeholder (R4U would read hex-looking text as
    hex). `utf8`: see `_utf8`."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime.startswith(BINARY_TYPES):
        return _placeholder(len(raw), mime), False, None, None
    data, truncated, error = decode_body(encoding, raw, limit) if raw else (b"", False, None)
    if any(t in mime for t in TEXT_TYPES):
        return _decoded(data, content_type), truncated, error, _utf8(data, content_type)
    try:
        return _decoded(data, content_type, "strict"), truncated, error, _utf8(data, content_type)
    except UnicodeDecodeError:
        return _placeholder(len(raw), mime or "unknown type"), False, error, None


def _error(ex: Exchange, summary, provider_error: str | None, truncated: bool) -> str | None:
    """What went wrong, in a short sentence; None for a complete, successful exchange."""
    if ex.note:
        return ex.note
    if provider_error:
        return provider_error if ex.status_code < 400 else f"HTTP {ex.status_code}: {provider_error}"
    if ex.status_code >= 400:
        return f"HTTP {ex.status_code}"
    if summary is not None and summary.complete:
        return None  # the terminal event was seen: whatever the transport said afterwards
    if ex.transport_error:
        where = f" after {summary.events} events" if summary is not None else ""
        return f"{who_ended(ex.transport_error)}{where}: {ex.transport_error}"
    if ex.status_code == 0:
        return "no response"
    if summary is not None and not truncated:
        return f"stream ended by the upstream before its terminal event, after {summary.events} events"
    return None


def who_ended(message: str) -> str:
    """Say who ended an exchange, from mitmproxy's error message."""
    text = message.lower()
    if "client" in text:
        return "client aborted"
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if "killed" in text:
        return "killed"
    return "upstream failed"


def redact_headers(pairs: Iterable[tuple[str, str]], extra: frozenset[str] = frozenset()) -> dict[str, str]:
    """Headers as R4U stores them (name → value; repeated names joined), secrets replaced."""
    out: dict[str, str] = {}
    for name, value in pairs:
        if is_secret_header(name, extra):
            value = REDACTED
        key, value = _clean(name.lower()), _clean(value)
        out[key] = f"{out[key]}, {value}" if key in out and value != REDACTED else value
    return out


def _header(pairs: list[tuple[str, str]], name: str) -> str | None:
    for key, value in pairs:
        if key.lower() == name:
            return _clean(value)
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value):
    """`value` with every lone surrogate replaced by U+FFFD, in strings, lists and dicts.

    They come from bytes that are not UTF-8 in headers and URLs (mitmproxy keeps them as
    surrogate escapes) and from JSON escapes such as "\\ud83d" alone (a model name, a usage
    field, an error message). A record holding one cannot be stored as UTF-8, and R4U's JSON
    parser refuses it ("lone leading surrogate"): the record would never be delivered."""
    if isinstance(value, str):
        return value if value.isascii() or not _SURROGATE.search(value) else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


_CHARSET = re.compile(r"charset\s*=\s*\"?([\w.:-]+)", re.I)


def _text(data: bytes, content_type: str | None, errors: str = "replace") -> str:
    """Bytes to text in the declared charset (UTF-8 when none or unknown)."""
    found = _CHARSET.search(content_type or "")
    try:
        return data.decode(found.group(1) if found else "utf-8", errors)
    except LookupError:
        return data.decode("utf-8", errors)


def _decoded(data: bytes, content_type: str | None, errors: str = "replace") -> str | Utf8Text:
    """The text of a body (see `_text`); a big one read as UTF-8 stays its bytes (`Utf8Text`,
    encoded into the record's JSON slice by slice): as a `str` it would take up to 4 bytes a
    character. `errors="strict"` checks it in slices and raises as `_text` would."""
    if len(data) <= recordjson.SLICE or _utf8(data, content_type) is None:
        return _text(data, content_type, errors)
    if errors == "strict":
        decoder = codecs.getincrementaldecoder("utf-8")()
        for i in range(0, len(data), recordjson.SLICE):
            decoder.decode(data[i:i + recordjson.SLICE])
        decoder.decode(b"", final=True)
    return Utf8Text(data)


def _redacted(redactor: BodyRedactor, text: str | Utf8Text, raw: bytes | None, *, stream: bool) -> str | Utf8Text:
    """A body's text with its secret values replaced (see redact.py). A big one without a
    secret-looking key (the pre-check reads its bytes) stays bytes; with one, it is read whole."""
    if text.__class__ is Utf8Text:
        if not redactor.suspect(text.data):
            return text
        text = str(text)
    return redactor.event_stream(text, raw) if stream else redactor.json(text, raw)


def _utf8(data: bytes, content_type: str | None) -> bytes | None:
    """`data` when `_text` reads it as UTF-8, else None: the redaction's pre-check then reads
    these bytes rather than the text encoded again (see redact.py)."""
    found = _CHARSET.search(content_type or "")
    try:
        return data if found is None or codecs.lookup(found.group(1)).name == "utf-8" else None
    except LookupError:
        return data  # read as UTF-8 too


def _placeholder(size: int, mime: str) -> str:
    return f"[binary {size} bytes, {mime}]"


def _ms(at: float | None, origin: float) -> float | None:
    return None if at is None else round(max(0.0, at - origin) * 1000, 3)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
