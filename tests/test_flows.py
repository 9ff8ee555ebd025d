"""flows.freeze, with mitmproxy's test flows (the live path is in the e2e tests)."""

import pytest
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from r4u_mitm.proxy.flows import PIECES_KEY, freeze
from r4u_mitm.pure.record import who_ended


@pytest.mark.parametrize(("message", "live", "client", "said"), [
    # mitmproxy's HTTP/2 layers say the same for a client and an upstream that hang up: the
    # client connection (no longer readable at the error hook) tells them apart
    ("peer closed connection", True, ConnectionState.CLOSED, "client aborted"),
    ("peer closed connection", True, ConnectionState.CAN_WRITE, "client aborted"),
    ("peer closed connection", True, ConnectionState.OPEN, "upstream failed"),
    ("peer closed connection", False, ConnectionState.CLOSED, "upstream failed"),  # read from a file: unknown
    ("Client disconnected.", True, ConnectionState.OPEN, "client aborted"),
    ("Server disconnected.", True, ConnectionState.CLOSED, "upstream failed"),
])
def test_who_ended_an_exchange(message, live, client, said):
    flow = tflow.tflow(resp=True)
    flow.error, flow.live, flow.client_conn.state = mflow.Error(message), live, client
    exchange = freeze(flow, trace_id="t", provider="openai")
    assert who_ended(exchange.transport_error) == said
    assert message in exchange.transport_error


def test_a_flow_without_an_error_has_none():
    assert freeze(tflow.tflow(resp=True), trace_id="t", provider="openai").transport_error is None


def saved_flow(body: bytes, sizes, times, clock=1000.0, **changes):
    flow = tflow.tflow(resp=True)
    flow.response.headers["content-type"] = "text/event-stream"
    flow.response.raw_content = body
    flow.metadata[PIECES_KEY] = {"times": times, "sizes": sizes, "clock": clock,
                                 "started": flow.request.timestamp_start, **changes}
    return flow


def test_a_saved_flow_brings_its_pieces_and_their_arrival_times():
    body = b"data: 1\n\ndata: 2\n\n"
    flow = saved_flow(body, [9, 9], [5.0, 5.25])
    exchange = freeze(flow, trace_id="t", provider="openai")
    assert exchange.pieces == [b"data: 1\n\n", b"data: 2\n\n"]
    # monotonic here, from the wall clock there: the same gaps, and 1005.0 wall is that far before the start
    started_wall = flow.request.timestamp_start
    assert exchange.piece_times[1] - exchange.piece_times[0] == pytest.approx(0.25)
    assert exchange.piece_times[0] - exchange.started == pytest.approx(1005.0 - started_wall)


@pytest.mark.parametrize("changes", [{"started": 1.0}, {"sizes": [9, 8]}, {"sizes": [9, "9"]}, {"times": [5.0]},
                                     {"clock": "x"}, {"times": None}])
def test_pieces_that_are_not_this_bodys_are_ignored(changes):
    body = b"data: 1\n\ndata: 2\n\n"
    flow = saved_flow(body, [9, 9], [5.0, 5.25])
    flow.metadata[PIECES_KEY].update(changes)
    exchange = freeze(flow, trace_id="t", provider="openai")
    assert exchange.pieces == [body] and exchange.piece_times == []
