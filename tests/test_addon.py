"""The addon's hooks, fast, with mitmproxy's own test helpers (the real path is in test_tracer_e2e)."""

import re

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tflow, tutils

from r4u_mitm import addon as addon_module
from r4u_mitm.proxy.tap import Tap


def openai_flow(path="/v1/chat/completions", host="api.openai.com", **headers):
    flow = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", path=path.encode(),
                                       headers=((b"content-type", b"application/json"),)))
    flow.request.headers["host"] = host
    for name, value in headers.items():
        flow.request.headers[name.replace("_", "-")] = value
    return flow


def sse_response(flow):
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=None)
    return flow


def test_traces_only_matching_hosts(tracer):
    t, _ = tracer
    other, ours = openai_flow(host="example.com"), openai_flow()
    t.requestheaders(other)
    t.requestheaders(ours)
    assert list(t.link.open) == [ours.id]
    assert ours.metadata["r4u.trace_id"] == t.link.open[ours.id].trace_id


def test_tags_are_removed_from_untraced_hosts_too(tracer):
    t, _ = tracer
    flow = openai_flow(host="example.com", X_R4U_Session="s1", x_other="kept")
    t.requestheaders(flow)
    assert t.link.open == {} and "x-r4u-session" not in flow.request.headers
    assert flow.request.headers["x-other"] == "kept"


def test_tags_are_removed_before_upstream_and_skip_means_untraced(tracer):
    t, _ = tracer
    flow = openai_flow(X_R4U_Session="s1", X_R4U_Feature="search")
    t.requestheaders(flow)
    assert t.link.open[flow.id].properties == {"session": "s1", "feature": "search"}
    assert not any(k.lower().startswith("x-r4u-") for k in flow.request.headers)
    skipped = openai_flow(X_R4U_Skip="1")
    t.requestheaders(skipped)
    assert skipped.id not in t.link.open and "x-r4u-skip" not in skipped.request.headers


def test_event_streams_get_the_tap_and_json_is_left_buffered(tracer):
    t, _ = tracer
    stream, plain = sse_response(openai_flow()), openai_flow()
    plain.response = tutils.tresp(headers=((b"content-type", b"application/json"),))
    for flow in (stream, plain):
        t.requestheaders(flow)
        t.responseheaders(flow)
    assert isinstance(stream.response.stream, Tap)
    assert plain.response.stream is False


def test_one_record_per_exchange_whatever_ends_it(tracer):
    t, _ = tracer
    flow = sse_response(openai_flow())
    t.requestheaders(flow)
    t.responseheaders(flow)
    for piece in (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n", b""):
        assert flow.response.stream(piece) == piece
    t.response(flow)
    t.error(flow)  # a late error for the same flow adds nothing
    (record,) = t.link.writer.records
    assert record["metadata"]["stream_complete"] is True and record["metadata"]["events"] == 2
    assert flow.response.raw_content.endswith(b"data: [DONE]\n\n")  # visible in mitmweb and -w files


def test_open_flows_are_recorded_at_shutdown(tracer):
    t, tctx = tracer
    flow = openai_flow()
    t.requestheaders(flow)
    writer = t.link.writer
    tctx.master.should_exit.set()  # done() at shutdown, not at a script reload
    t.done()
    (record,) = writer.records
    assert record["error"] == "proxy stopped before the exchange finished"
    assert record["status_code"] == 0


def test_a_fault_inside_the_addon_never_reaches_the_flow(tracer, monkeypatch):
    t, _ = tracer

    class BrokenRules:
        def match(self, *args):
            raise RuntimeError("injected fault")

    monkeypatch.setattr(t, "rules", BrokenRules())
    flow = openai_flow(X_R4U_Session="s1")
    assert t.requestheaders(flow) is None
    assert t.link.internal_errors == 1 and "x-r4u-session" not in flow.request.headers  # taken out first
    assert "internal_errors=1" in t.status()


def test_a_fault_while_building_the_record_is_contained(tracer, monkeypatch):
    t, _ = tracer
    monkeypatch.setattr(addon_module, "freeze", lambda *a, **k: 1 / 0)
    flow = sse_response(openai_flow())
    t.requestheaders(flow)
    t.responseheaders(flow)
    assert flow.response.stream(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert t.link.budget.used == 14
    t.response(flow)
    assert t.link.internal_errors == 1 and t.link.writer.records == []
    assert t.link.budget.used == 0  # a stream never stored gives its bytes back to the other taps


@pytest.mark.parametrize("option, value, message", [
    ("r4u_hosts", ["api.openai.com=nonsense"], "r4u_hosts"),
    ("r4u_max_body_bytes", 0, "r4u_max_body_bytes"),
    ("r4u_api_url", "ftp://x", "r4u_api_url: must be an http:// or https:// URL, not 'ftp://x'"),
    ("r4u_api_url", "http://localhost:99999", r"r4u_api_url: invalid port in 'http://localhost:99999'"),
    ("r4u_api_url", "http://user:pw@localhost:abc/v1", r"r4u_api_url: invalid port in 'http://localhost:abc/v1'"),
    ("r4u_api_url", "http:///v1", "r4u_api_url: no host in 'http:///v1'"),
    ("r4u_ca_file", "/no/such/ca.pem", "r4u_ca_file: cannot read /no/such/ca.pem: No such file or directory"),
    ("r4u_drain_seconds", -1, "r4u_drain_seconds"),
    ("r4u_max_attempts", 0, "r4u_max_attempts must be 1 or more, not 0"),
])
def test_bad_options_are_refused_clearly(tracer, option, value, message):
    t, tctx = tracer
    with pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(t, **{option: value})


@pytest.mark.parametrize("alias, url", [
    (True, "https://api.openai.com/v1/chat/completions"),
    (False, "https://res.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21"),
])
def test_the_openai_url_alias_option_goes_with_each_exchange(tracer, alias, url):
    """Stored with the exchange (the deliverer builds the record with it), as the redaction options."""
    t, tctx = tracer
    tctx.configure(t, r4u_openai_url_alias=alias)
    flow = openai_flow("/openai/deployments/d/chat/completions?api-version=2024-10-21", host="res.openai.azure.com")
    t.requestheaders(flow)
    flow.response = tutils.tresp(headers=((b"content-type", b"application/json"),), content=b"{}")
    t.response(flow)
    (record,) = t.link.writer.records
    assert record["metadata"]["url"] == url and record["metadata"]["provider"] == "azure_openai"
    assert ("upstream_url" in record["metadata"]) is alias


def test_max_attempts_goes_to_the_deliverer(tracer, monkeypatch):
    from r4u_mitm.delivery import deliver

    t, tctx = tracer
    started = {}
    monkeypatch.setattr(t.link, "start", lambda **kw: started.update(kw))
    tctx.configure(t, r4u_max_attempts=2)
    t._start()
    opts = deliver.parser().parse_args(started["deliverer_args"])  # what the deliverer makes of them
    assert opts.max_attempts == 2 and opts.r4u_url == "http://127.0.0.1:9"


def test_a_refused_delivery_option_leaves_the_working_spool_in_place(tmp_path):
    """Check the new settings first, switch only on success: a bad `--set` at runtime (mitmweb,
    the console) changes nothing, and mitmproxy's rollback switches nothing back."""
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer

    t = R4UTracer()
    not_sqlite = tmp_path / "not-an-outbox"
    not_sqlite.write_bytes(b"hello" * 100)
    bad_pem = tmp_path / "ca.pem"
    bad_pem.write_text("not a certificate\n")
    with taddons.context(t) as tctx:
        tctx.configure(t, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        working = t.link
        for option, value, message in [
            ("r4u_outbox", str(not_sqlite), f"r4u_outbox: {not_sqlite} is not an r4u-mitm outbox (not a SQLite"),
            ("r4u_outbox", "/proc/no/outbox.sqlite", "r4u_outbox: cannot create /proc/no/outbox.sqlite: No such "
                                                     "file or directory (set r4u_outbox or confdir to a writable place)"),
            ("r4u_ca_file", str(bad_pem), f"r4u_ca_file: {bad_pem} is not a PEM CA bundle: "),
            ("r4u_api_url", "http://127.0.0.1:99999", "r4u_api_url: invalid port in 'http://127.0.0.1:99999'"),
        ]:
            with pytest.raises(exceptions.OptionsError, match=re.escape(message)):
                tctx.options.update(**{option: value})
            assert t.link is working
        assert tctx.options.r4u_outbox == str(tmp_path / "outbox.sqlite")  # rolled back
        assert not_sqlite.read_bytes() == b"hello" * 100  # someone else's file is left alone
        tctx.options.update(r4u_outbox=str(tmp_path / "other.sqlite"))  # a good change switches
        assert t.link is not working and t.link.path == tmp_path / "other.sqlite"


def test_no_tracing_when_the_options_were_refused(tmp_path):
    """Options refused at the start: the addon does not trace into the void (tags still go)."""
    from mitmproxy.options import Options
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer

    t = R4UTracer()
    with taddons.context(t, options=Options(confdir="/proc/r4u-none")) as tctx:
        with pytest.raises(exceptions.OptionsError, match="r4u_outbox: cannot create /proc/r4u-none/"):
            tctx.configure(t)
        assert t.link is None
        flow = openai_flow(X_R4U_Session="s1")
        t.requestheaders(flow)
        assert "x-r4u-session" not in flow.request.headers and "r4u.trace_id" not in flow.metadata


def test_the_flow_comment_follows_the_trace_delivery(tracer):
    t, _ = tracer
    flows = [openai_flow(), openai_flow()]
    for flow in flows:
        t.requestheaders(flow)
        flow.response = tutils.tresp(headers=((b"content-type", b"application/json"),))
        t.response(flow)
    ids = [flow.metadata["r4u.trace_id"] for flow in flows]
    assert flows[0].comment == f"r4u {ids[0][:8]} · pending"
    t._delivery_outcome({"trace": ids[0], "outcome": "waiting for R4U"})
    assert flows[0].comment == f"r4u {ids[0][:8]} · waiting for R4U"
    t._delivery_outcome({"trace": ids[0], "outcome": "delivered"})
    t._delivery_outcome({"trace": ids[1], "outcome": "dead-lettered", "reason": "HTTP 422: body.request: Field required"})
    assert flows[0].comment == f"r4u {ids[0][:8]} · delivered" and not flows[0].marked
    assert flows[1].comment == f"r4u {ids[1][:8]} · dead-lettered: HTTP 422: body.request: Field required"
    assert flows[1].marked
    t._delivery_outcome({"trace": ids[1], "outcome": "delivered"})  # settled: no longer followed
    assert flows[1].comment.endswith("· dead-lettered: HTTP 422: body.request: Field required")
    t._delivery_outcome({"trace": "unknown-trace", "outcome": "delivered"})  # a flow long gone: nothing to do


@pytest.mark.parametrize("reason, shown", [
    (None, "dead-lettered"),
    ("", "dead-lettered"),
    ("cannot build the record:\n  TypeError:\tbad", "dead-lettered: cannot build the record: TypeError: bad"),
    ("HTTP 400: " + "x" * 300, "dead-lettered: HTTP 400: " + "x" * (addon_module.REASON_SHOWN - 11) + "…"),
    (["not", "text"], "dead-lettered: ['not', 'text']"),
])
def test_a_dead_letter_comment_says_why_on_one_short_line(tracer, reason, shown):
    t, _ = tracer
    flow = openai_flow()
    t.requestheaders(flow)
    flow.response = tutils.tresp(headers=((b"content-type", b"application/json"),))
    t.response(flow)
    trace_id = flow.metadata["r4u.trace_id"]
    t._delivery_outcome({"trace": trace_id, "outcome": "dead-lettered", "reason": reason})
    assert flow.comment == f"r4u {trace_id[:8]} · {shown}" and flow.marked
    assert len(flow.comment) <= len(f"r4u {trace_id[:8]} · dead-lettered: ") + addon_module.REASON_SHOWN


def test_plain_mitmdump_does_not_copy_streamed_bodies_back(tmp_path):
    """Without mitmweb/console (no view) and no save file, nobody looks at the flow afterwards:
    restoring the body would only cost a copy on the event loop."""
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer
    from tests.conftest import Spooled

    t = R4UTracer()
    with taddons.context(t) as tctx:
        tctx.configure(t, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        t.link.writer = Spooled()
        flow = sse_response(openai_flow())
        t.requestheaders(flow)
        t.responseheaders(flow)
        flow.response.stream(b"data: [DONE]\n\n")
        t.response(flow)
        assert flow.response.raw_content is None
        assert t.link.writer.records[0]["response"] == "data: [DONE]\n\n"


def test_flush_wakes_the_spools_deliverer(tracer, tmp_path):
    """`r4u.flush` → a flush datagram to the deliverer of this spool (what it then does is in
    test_deliver::test_flush_tries_now_instead_of_waiting_for_the_backoff)."""
    from r4u_mitm import wake

    t, _ = tracer
    sock = wake.bind(t.link.path)  # where the deliverer of this spool listens
    try:
        t.flush()
        assert sock.recv(16) == wake.FLUSH
    finally:
        sock.close()


def test_status_says_what_the_spool_and_the_proxy_know(tracer):
    t, _ = tracer
    flow = openai_flow()
    t.requestheaders(flow)
    status = dict(item.split("=", 1) for item in t.status().split(", "))
    assert status["open"] == "1" and status["traced"] == "0" and status["outbox"] == str(t.link.path)
    assert {"pending", "delivered", "retried", "dead_lettered", "dropped", "record_errors", "reachable",
            "last_error", "internal_errors", "store_errors", "memory_used_mb"} <= set(status)
