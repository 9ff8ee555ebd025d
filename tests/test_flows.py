"""flows.freeze, with mitmproxy's test flows (the live path is in the e2e tests)."""

import pytest
from mitmproxy import flow as mflow
from mitmproxy.connection import ConnectionState
from mitmproxy.test import tflow

from r4u_mitm.proxy.flows import freeze
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
