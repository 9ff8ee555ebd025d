"""The addon's hooks, fast, with mitmproxy's own test helpers (the real path is in test_tracer_e2e)."""

import re

import pytest
from mitmproxy import exceptions
from mitmproxy.test import tflow, tutils

from r4u_mitm import addon as addon_module
from r4u_mitm.tap import Tap


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
    assert list(t.open) == [ours.id]
    assert ours.metadata["r4u.trace_id"] == t.open[ours.id].trace_id


def test_tags_are_removed_from_untraced_hosts_too(tracer):
    t, _ = tracer
    flow = openai_flow(host="example.com", X_R4U_Session="s1", x_other="kept")
    t.requestheaders(flow)
    assert t.open == {} and "x-r4u-session" not in flow.request.headers
    assert flow.request.headers["x-other"] == "kept"


def test_tags_are_removed_before_upstream_and_skip_means_untraced(tracer):
    t, _ = tracer
    flow = openai_flow(X_R4U_Session="s1", X_R4U_Feature="search")
    t.requestheaders(flow)
    assert t.open[flow.id].properties == {"session": "s1", "feature": "search"}
    assert not any(k.lower().startswith("x-r4u-") for k in flow.request.headers)
    skipped = openai_flow(X_R4U_Skip="1")
    t.requestheaders(skipped)
    assert skipped.id not in t.open and "x-r4u-skip" not in skipped.request.headers


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
    (record,) = t.delivery.records
    assert record["metadata"]["stream_complete"] is True and record["metadata"]["events"] == 2
    assert flow.response.raw_content.endswith(b"data: [DONE]\n\n")  # visible in mitmweb and -w files


def test_open_flows_are_recorded_at_shutdown(tracer):
    t, tctx = tracer
    flow = openai_flow()
    t.requestheaders(flow)
    delivery = t.delivery
    t.done()
    (record,) = delivery.records
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
    assert t.internal_errors == 1 and "x-r4u-session" not in flow.request.headers  # taken out first
    assert "internal_errors=1" in t.status()


def test_a_fault_while_building_the_record_is_contained(tracer, monkeypatch):
    t, _ = tracer
    monkeypatch.setattr(addon_module, "freeze", lambda *a, **k: 1 / 0)
    flow = openai_flow()
    t.requestheaders(flow)
    flow.response = tutils.tresp()
    t.response(flow)
    assert t.internal_errors == 1 and t.delivery.records == []


@pytest.mark.parametrize("option, value, message", [
    ("r4u_hosts", ["api.openai.com=nonsense"], "r4u_hosts"),
    ("r4u_max_body_bytes", 0, "r4u_max_body_bytes"),
    ("r4u_api_url", "ftp://x", "r4u_api_url: must be an http:// or https:// URL, not 'ftp://x'"),
    ("r4u_api_url", "http://localhost:99999", r"r4u_api_url: invalid port in 'http://localhost:99999'"),
    ("r4u_api_url", "http://user:pw@localhost:abc/v1", r"r4u_api_url: invalid port in 'http://localhost:abc/v1'"),
    ("r4u_api_url", "http:///v1", "r4u_api_url: no host in 'http:///v1'"),
    ("r4u_ca_file", "/no/such/ca.pem", "r4u_ca_file: cannot read /no/such/ca.pem: No such file or directory"),
    ("r4u_drain_seconds", -1, "r4u_drain_seconds"),
])
def test_bad_options_are_refused_clearly(tracer, option, value, message):
    t, tctx = tracer
    with pytest.raises(exceptions.OptionsError, match=message):
        tctx.configure(t, **{option: value})


def test_a_refused_delivery_option_leaves_the_working_delivery_in_place(tmp_path):
    """Build the new delivery first, swap only on success: a bad `--set` at runtime (mitmweb,
    the console) changes nothing, and mitmproxy's rollback does not rebuild the delivery."""
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer

    t = R4UTracer()
    not_sqlite = tmp_path / "not-an-outbox"
    not_sqlite.write_bytes(b"hello" * 100)
    bad_pem = tmp_path / "ca.pem"
    bad_pem.write_text("not a certificate\n")
    with taddons.context(t) as tctx:
        tctx.configure(t, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        working = t.delivery
        for option, value, message in [
            ("r4u_outbox", str(not_sqlite), f"r4u_outbox: {not_sqlite} is not an r4u-mitm outbox (not a SQLite"),
            ("r4u_outbox", "/proc/no/outbox.sqlite", "r4u_outbox: cannot create /proc/no/outbox.sqlite: No such "
                                                     "file or directory (set r4u_outbox or confdir to a writable place)"),
            ("r4u_ca_file", str(bad_pem), f"r4u_ca_file: {bad_pem} is not a PEM CA bundle: "),
            ("r4u_api_url", "http://127.0.0.1:99999", "r4u_api_url: invalid port in 'http://127.0.0.1:99999'"),
        ]:
            with pytest.raises(exceptions.OptionsError, match=re.escape(message)):
                tctx.options.update(**{option: value})
            assert t.delivery is working and not working._stopped
        assert tctx.options.r4u_outbox == str(tmp_path / "outbox.sqlite")  # rolled back
        working.submit(lambda: {"metadata": {"trace_id": "t-1"}}, "t-1")
        working.stop(None)
        assert working.status()["pending"] == 1  # it still stores
        tctx.options.update(r4u_outbox=str(tmp_path / "other.sqlite"))  # a good change replaces it
        assert t.delivery is not working and t.delivery.outbox_path == tmp_path / "other.sqlite"
        t.delivery.stop(None)


def test_no_tracing_without_a_delivery(tmp_path):
    """Options refused at the start: the addon does not trace into the void (tags still go)."""
    from mitmproxy.options import Options
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer

    t = R4UTracer()
    with taddons.context(t, options=Options(confdir="/proc/r4u-none")) as tctx:
        with pytest.raises(exceptions.OptionsError, match="r4u_outbox: cannot create /proc/r4u-none/"):
            tctx.configure(t)
        assert t.delivery is None
        flow = openai_flow(X_R4U_Session="s1")
        t.requestheaders(flow)
        assert t.open == {} and "x-r4u-session" not in flow.request.headers and t.internal_errors == 0


def test_the_flow_comment_follows_the_trace_delivery(tracer):
    t, _ = tracer
    flows = [openai_flow(), openai_flow()]
    for flow in flows:
        t.requestheaders(flow)
        flow.response = tutils.tresp(headers=((b"content-type", b"application/json"),))
        t.response(flow)
    ids = [flow.metadata["r4u.trace_id"] for flow in flows]
    assert flows[0].comment == f"r4u {ids[0][:8]} · pending"
    t._delivery_outcome(ids[0], "waiting for R4U")
    assert flows[0].comment == f"r4u {ids[0][:8]} · waiting for R4U"
    t._delivery_outcome(ids[0], "delivered")
    t._delivery_outcome(ids[1], "dead-lettered")
    assert flows[0].comment.endswith("· delivered") and not flows[0].marked
    assert flows[1].comment.endswith("· dead-lettered") and flows[1].marked
    t._delivery_outcome("unknown-trace", "delivered")  # a flow long gone: nothing to do


def test_plain_mitmdump_does_not_copy_streamed_bodies_back(tmp_path):
    """Without mitmweb/console (no view) and no save file, nobody looks at the flow afterwards:
    restoring the body would only cost a copy on the event loop."""
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer
    from tests.conftest import Submitted

    t = R4UTracer()
    with taddons.context(t) as tctx:
        tctx.configure(t, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        t.delivery.stop(None)
        t.delivery = Submitted()
        flow = sse_response(openai_flow())
        t.requestheaders(flow)
        t.responseheaders(flow)
        flow.response.stream(b"data: [DONE]\n\n")
        t.response(flow)
        assert flow.response.raw_content is None
        assert t.delivery.records[0]["response"] == "data: [DONE]\n\n"
