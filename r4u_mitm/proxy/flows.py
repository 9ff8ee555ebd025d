"""A mitmproxy flow → a `record.Exchange` (plain data). Shared by the live addon and backfill;
the only module besides the addon that knows mitmproxy's flow objects."""

from __future__ import annotations

import itertools
import time
import uuid

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from r4u_mitm.proxy.tap import Tap
from r4u_mitm.pure.record import Exchange

TAG_PREFIX = "x-r4u-"
H2_PEER_CLOSED = "peer closed connection"
# {"times": [monotonic s], "sizes": [bytes], "clock": wall - monotonic, "started": the request's
# timestamp_start}: each teed piece of the response body, as it arrived (a copy of the tap's
# times, as a list); "started" ties them to this exchange (a replayed flow is another one).
# Left on flows someone will look at or save (see the addon's `_restore_body`).
PIECES_KEY = "r4u.pieces"
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

    error = _error_message(flow)
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
        saved = saved_pieces(flow.metadata, resp.raw_content, req.timestamp_start)
        if saved is not None:  # a flow the addon saved: backfill times its stream as the live trace did
            sizes, walls = saved
            ends = list(itertools.accumulate(sizes))
            exchange.pieces = [resp.raw_content[a:b] for a, b in zip([0, *ends], ends)]
            exchange.piece_times = [mono(wall) for wall in walls]
    return exchange


def saved_pieces(metadata: dict, body: bytes | None, started: float) -> tuple[list[int], list[float]] | None:
    """The sizes of `body`'s teed pieces and their arrival times (wall clock), as the addon left
    them on its flow (`PIECES_KEY`, kept in saved flow files), or None when they are not there or
    not this body's."""
    pieces = metadata.get(PIECES_KEY)
    try:
        times, sizes, clock = pieces["times"], pieces["sizes"], float(pieces["clock"])
        if (body is not None and pieces["started"] == started and len(times) == len(sizes)
                and all(type(n) is int and n >= 0 for n in sizes) and sum(sizes) == len(body)):
            return sizes, [float(at) + clock for at in times]
    except (TypeError, KeyError, ValueError):
        pass
    return None


def _error_message(flow: http.HTTPFlow) -> str | None:
    """mitmproxy's error message, with who ended the exchange when only the connections say it:
    its HTTP/2 layers say "peer closed connection" for a client's and for an upstream's alike.
    At the `error` hook of a live flow, a client that hung up can no longer be read from."""
    if flow.error is None:
        return None
    message = flow.error.msg
    if message == H2_PEER_CLOSED and flow.live and not flow.client_conn.state & ConnectionState.CAN_READ:
        return f"client closed its connection ({message})"
    return message


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
