"""A mitmproxy flow → a `record.Exchange` (plain data). Shared by the live addon and backfill;
the only module besides the addon that knows mitmproxy's flow objects."""

from __future__ import annotations

import time
import uuid

from mitmproxy import http

from r4u_mitm.proxy.tap import Tap
from r4u_mitm.pure.record import Exchange

TAG_PREFIX = "x-r4u-"
NOT_STORED = "response body not kept: streamed without the tracer's tap (stream_large_bodies without store_streamed_bodies, or a tracer fault)"


class Trace:
    """What the addon keeps for a traced flow until it ends (defined here, not in the addon
    module that mitmproxy re-executes on reload: an open trace outlives a reload)."""

    __slots__ = ("flow", "trace_id", "provider", "properties", "tap")

    def __init__(self, flow: http.HTTPFlow, provider: str, properties: dict[str, str]) -> None:
        self.flow = flow
        self.trace_id = str(uuid.uuid4())
        self.provider = provider
        self.properties = properties
        self.tap: Tap | None = None


def freeze(flow: http.HTTPFlow, *, trace_id: str, provider: str, properties: dict[str, str] | None = None,
           tap: Tap | None = None, note: str | None = None) -> Exchange:
    """Copy what the record needs out of `flow` (cheap: bodies are referenced, not copied).

    Times become monotonic seconds; a teed stream brings its own piece arrival times and end.
    Without a tap (a buffered body, a flow read from a file) no piece times are known."""
    req, resp = flow.request, flow.response
    now_wall, now_mono = time.time(), time.monotonic()

    def mono(wall: float | None) -> float | None:
        return None if wall is None else now_mono - (now_wall - wall)

    error = flow.error.msg if flow.error else None
    ended_wall = flow.error.timestamp if flow.error else (resp.timestamp_end if resp else None)
    exchange = Exchange(
        trace_id=trace_id,
        provider=provider,
        url=req.pretty_url,
        method=req.method,
        path=req.path.split("?", 1)[0],
        request_headers=_pairs(req.headers),
        request_body=req.raw_content,
        started_wall=req.timestamp_start,
        started=mono(req.timestamp_start),
        ended=mono(ended_wall) if ended_wall else now_mono,
        transport_error=error,
        properties=dict(properties or {}),
        note=note,
    )
    if resp is None:
        return exchange
    exchange.status_code = resp.status_code
    exchange.response_headers = _pairs(resp.headers)
    exchange.headers_at = mono(resp.timestamp_start)
    exchange.stream = "text/event-stream" in resp.headers.get("content-type", "")
    if tap is not None:
        exchange.pieces, exchange.piece_times = tap.pieces, tap.times
        exchange.wire_bytes, exchange.truncated = tap.wire_bytes, tap.truncated
        if tap.ended_at is not None and error is None:
            exchange.ended = tap.ended_at
    elif resp.raw_content is None:
        exchange.note = exchange.note or NOT_STORED
    else:
        exchange.pieces = [resp.raw_content]
        exchange.wire_bytes = len(resp.raw_content)
    return exchange


def _pairs(headers) -> list[tuple[str, str]]:
    """`headers.items(multi=True)` as a list, decoded as mitmproxy decodes them, in half its time
    (on the event loop, for every traced exchange)."""
    return [(k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for k, v in headers.fields]


def pop_tags(headers) -> dict[str, str]:
    """Remove the app's `X-R4U-<Name>` headers (they must not reach the upstream) and return
    them as trace properties, names lower-cased."""
    found = {k: v for k, v in headers.items(multi=True) if k.lower().startswith(TAG_PREFIX)}
    for name in found:
        del headers[name]
    return {k[len(TAG_PREFIX):].lower(): v for k, v in found.items()}


def skip_requested(properties: dict[str, str]) -> bool:
    """`X-R4U-Skip: 1` (or true/yes): the app asks for this exchange not to be traced."""
    return properties.pop("skip", "").strip().lower() in ("1", "true", "yes")
