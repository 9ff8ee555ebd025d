"""Transparency, for real: whatever the addon meets, the app gets exactly what the upstream sent.

Everything goes through real mitmdump processes: one with the addon, one without it (plain
mitmdump, the reference), one with the addon and `tests/fakes/faults.py` (fault injection).

1. Property test (hypothesis): random event streams (random fields and data, non-ASCII, CR / LF /
   CRLF line endings, comments, with or without `[DONE]`), written to a temp dir served by a second
   FakeUpstream; random chunking, small delays, content-encodings, chunked / content-length /
   close-delimited framing, event-stream or JSON content type; HTTP/1.1 and HTTP/2 clients.
   Defined outcome: the client gets byte-identical bodies and the same headers (minus the ones
   that differ per request) through the addon as through plain mitmdump, and R4U gets one trace
   whose `response` is the decoded upstream body.
2. Fault isolation: a fault injected anywhere in the addon's code never changes what the client
   gets; it is logged once per affected flow and counted (see each case for where).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import time
import uuid
import zlib
from pathlib import Path

import brotli
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4u_mitm.proxy.flows import NOT_STORED
from r4u_mitm.spool import read_stats
from tests.conftest import SECRET, traces_for
from tests.harness import ROOT, Mitmdump, wait_for

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd

FAULTS = ROOT / "tests" / "fakes" / "faults.py"
CHAT_URL = "https://api.openai.com/v1/chat/completions"
# Response headers the fake makes up anew for every request.
VARYING = {"date", "x-request-id", "set-cookie", "openai-processing-ms", "openai-project",
           "x-envoy-upstream-service-time", "x-ratelimit-remaining-tokens", "cf-ray"}


# -- clients ---------------------------------------------------------------------------------------

class _H2First(ssl.SSLContext):
    """httpx (httpcore) offers ALPN ["http/1.1", "h2"] through a proxy tunnel, and mitmproxy
    honours the client's order, so it would always pick HTTP/1.1. A client that prefers h2
    (curl, browsers) lists it first: this context does that, httpx then speaks HTTP/2."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def make_client(proxy: Mitmdump, http2: bool = False, **kw) -> httpx.Client:
    context = _H2First(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(proxy.ca_file))
    return httpx.Client(proxy=proxy.url, verify=context, http2=http2, timeout=30, **kw)


def fetch(client: httpx.Client, x_fake: str, *, test_id: str, tag: str | None = None,
          body: dict | None = None, url: str = CHAT_URL) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """One request; (status, http version, response headers as sent, body as on the wire)."""
    hdrs = {"x-fake": x_fake, "x-test-id": test_id, "authorization": f"Bearer {SECRET}"}
    if tag:
        hdrs["X-R4U-Test"] = tag
    with client.stream("POST", url, json=body or {"model": "gpt-4o-mini", "stream": True}, headers=hdrs) as r:
        raw = b"".join(r.iter_raw())
        return r.status_code, r.http_version, [(k.decode(), v.decode()) for k, v in r.headers.raw], raw


def upstream_record(fake, test_id: str, timeout: float = 10) -> dict:
    """The fake upstream's record of the request carrying `x-test-id: test_id`, once answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in list(fake.requests):
            if ("x-test-id", test_id) in [(k.lower(), v) for k, v in rec["headers"]] and rec["done"]:
                return rec
        time.sleep(0.02)
    raise AssertionError(f"the upstream did not answer {test_id}")


def stable(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers if k.lower() not in VARYING]


def decompress(encoding: str | None, data: bytes) -> bytes:
    """An oracle independent of r4u_mitm.pure.encoding."""
    if not encoding:
        return data
    if encoding == "gzip":
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompress(data)
    if encoding == "br":
        return brotli.decompress(data)
    return zstd.decompress(data)


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def streams_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("random-streams")


@pytest.fixture(scope="module")
def rand_upstream(streams_dir):
    from tests.fakes.upstream import FakeUpstream

    fake = FakeUpstream(tls=True, streams_dir=streams_dir)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, rand_upstream, r4u):
    with Mitmdump(tmp_path_factory.mktemp("traced"), r4u_url=r4u.url, upstream_port=rand_upstream.port) as p:
        yield p


@pytest.fixture(scope="module")
def plain(tmp_path_factory, rand_upstream):
    with Mitmdump(tmp_path_factory.mktemp("plain"), upstream_port=rand_upstream.port, addon=False) as p:
        yield p


# -- random event streams ----------------------------------------------------------------------------

# No '{' and no '[': random data is never JSON nor [DONE], so the only terminal event is ours.
# \x85, \u2028, \x0b, \x1c are line breaks for str.splitlines but ordinary characters in SSE.
_CHARS = st.sampled_from(list("abcxyz XYZ019_-:.,\"'\t=") + [
    "é", "ß", "ñ", "Ω", "≈", "—", "北", "京", "你", "😊", "👍", "\U0001f3fd", "\u00a0", "\u2028", "\x85", "\x0b",
    "\x1c", "\x00", "\ufeff", "\\",
])
_TEXT = st.text(_CHARS, max_size=30)


@st.composite
def _event(draw) -> tuple[list[str], bool]:
    """The lines of one event (without endings), and whether it dispatches (has data)."""
    lines: list[str] = []
    data_lines = draw(st.lists(_TEXT, max_size=3))
    for value in data_lines:
        lines.append(f"data:{' ' if draw(st.booleans()) else ''}{value}")
    if draw(st.booleans()):
        lines.append(f"event: {draw(st.sampled_from(['message', 'delta', 'ping', 'ünïcode', '']))}")
    if draw(st.integers(0, 3)) == 0:
        lines.append(f"id: {draw(_TEXT)}")
    if draw(st.integers(0, 3)) == 0:
        lines.append(f":{draw(_TEXT)}")  # a comment
    if draw(st.integers(0, 5)) == 0:
        lines.append(f"retry: {draw(st.integers(0, 5000))}")
    if draw(st.integers(0, 6)) == 0:  # odd lines: a bare "data" is a data line with an empty value
        odd = draw(st.sampled_from(["data", "unknown: field", "garbage without colon"]))
        lines.append(odd)
        if odd == "data":
            data_lines.append("")
    lines = draw(st.permutations(lines))
    return lines, bool(data_lines)


@st.composite
def sse_streams(draw) -> tuple[bytes, int, bool]:
    """(stream bytes, events it dispatches, ends with the terminal [DONE] event)."""
    eol = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    events = draw(st.lists(_event(), max_size=12))
    done = draw(st.booleans())
    if done:
        events.append((["data: [DONE]"], True))
    text = "".join("".join(line + eol for line in lines) + eol for lines, _ in events)
    if draw(st.integers(0, 4)) == 0:
        text += "data: an unterminated event"  # no blank line: discarded by SSE
    return text.encode("utf-8"), sum(1 for _, dispatches in events if dispatches), done


_WIRE = st.fixed_dictionaries({
    "chunk": st.one_of(st.just("event"), st.integers(1, 40).map(str),
                       st.integers(0, 10**6).map(lambda s: f"random:{s}")),
    "delay_ms": st.sampled_from([0, 0, 1, 2]),
    "framing": st.sampled_from(["chunked", "length", "close"]),
    "encoding": st.sampled_from([None, "gzip", "deflate", "br", "zstd"]),
    "content_type": st.sampled_from([None, None, "text/event-stream", "application/json"]),
})


@settings(max_examples=int(os.environ.get("R4U_E2E_EXAMPLES", "25")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=sse_streams(), wire=_WIRE, http2=st.booleans())
def test_random_streams_reach_the_client_unchanged_and_are_traced_whole(
        traced, plain, rand_upstream, streams_dir, r4u, stream, wire, http2):
    raw, n_events, done = stream
    name = f"{uuid.uuid4().hex}.sse"
    (streams_dir / name).write_bytes(raw)
    x_fake = f"stream={name};chunk={wire['chunk']};delay_ms={wire['delay_ms']};framing={wire['framing']}"
    if wire["encoding"]:
        x_fake += f";encoding={wire['encoding']}"
    if wire["content_type"]:
        x_fake += f";content_type={wire['content_type'].replace(';', '%3B')}"
    is_sse = wire["content_type"] in (None, "text/event-stream")
    tag, id_traced, id_plain = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex

    with make_client(traced, http2) as client:
        got = fetch(client, x_fake, test_id=id_traced, tag=tag)
    with make_client(plain, http2) as client:
        ref = fetch(client, x_fake, test_id=id_plain, tag=tag)
    sent = upstream_record(rand_upstream, id_traced)
    sent_plain = upstream_record(rand_upstream, id_plain)

    # The app's view: the same as without the addon, and what the upstream sent.
    status, version, hdrs, body = got
    assert (status, version) == (ref[0], ref[1]) == (200, "HTTP/2" if http2 else "HTTP/1.1")
    assert body == ref[3]
    assert decompress(wire["encoding"], body) == sent["response_body"] == raw
    assert stable(hdrs) == stable(ref[2])

    # The upstream's view: the same request, but for the app's X-R4U-* tags (taken out).
    assert sent["body"] == sent_plain["body"]
    ours = {"x-test-id", "x-r4u-test"}
    assert [(k.lower(), v) for k, v in sent["headers"] if k.lower() not in ours] == \
        [(k.lower(), v) for k, v in sent_plain["headers"] if k.lower() not in ours]
    assert not [k for k, _ in sent["headers"] if k.lower().startswith("x-r4u-")]

    # R4U's view: the decoded upstream body, whole.
    (trace,) = traces_for(r4u, tag)
    assert trace["status_code"] == 200
    assert trace["response"] == sent["response_body"].decode("utf-8")
    meta = trace["metadata"]
    assert meta["stream"] is is_sse
    assert meta["response_bytes"] == sent["wire_bytes"]
    assert "truncated" not in meta and "decode_error" not in meta
    if is_sse:
        assert meta["events"] == n_events
        assert meta["stream_complete"] is done
        if done:
            assert trace["error"] is None
        else:
            assert trace["error"] == f"stream ended by the upstream before its terminal event, after {n_events} events"
    else:
        assert trace["error"] is None and meta["events"] is None


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_known_streams_through_both_protocols(traced, plain, rand_upstream, streams_dir, r4u, http2):
    """A fixed, realistic case of the property above (a quick, deterministic smoke check)."""
    from tests.conftest import stream_bytes

    raw = stream_bytes("openai_chat/include_usage.sse")
    (streams_dir / "include_usage.sse").write_bytes(raw)
    tag, a, b = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    x_fake = "stream=include_usage.sse;chunk=random:11;encoding=gzip"
    with make_client(traced, http2) as client:
        got = fetch(client, x_fake, test_id=a, tag=tag)
    with make_client(plain, http2) as client:
        ref = fetch(client, x_fake, test_id=b)
    assert got[1] == ("HTTP/2" if http2 else "HTTP/1.1")
    assert got[3] == ref[3] and decompress("gzip", got[3]) == raw
    assert stable(got[2]) == stable(ref[2])
    (trace,) = traces_for(r4u, tag)
    assert trace["response"] == raw.decode()
    assert trace["metadata"]["stream_complete"] is True and trace["metadata"]["usage"]["total_tokens"] > 0


def test_an_http2_client_that_hangs_up_mid_stream_is_the_one_blamed(traced, rand_upstream, r4u):
    tag = uuid.uuid4().hex
    with make_client(traced, http2=True) as client, client.stream(
            "POST", CHAT_URL, json={"model": "gpt-4o-mini", "stream": True},
            headers={"x-fake": "synth=10;delay_ms=100", "X-R4U-Test": tag}) as r:
        assert r.http_version == "HTTP/2"
        pieces = r.iter_raw()
        next(pieces), next(pieces)
    # the response and the client (its one HTTP/2 connection) are closed mid-stream
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["stream_complete"] is False
    assert trace["error"].startswith("client aborted"), trace["error"]


# -- fault isolation -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory, upstream, r4u):
    """mitmdump with the addon and the fault injector (loaded after it). The addon logs its first
    10 internal errors, then every 1000th: the tests here make 8 in all."""
    from tests.fakes.faults import DELIVERER_FAULTS_ENV

    with Mitmdump(tmp_path_factory.mktemp("faulty"), r4u_url=r4u.url, upstream_port=upstream.port,
                  args=("-s", str(FAULTS)), env=DELIVERER_FAULTS_ENV) as p:
        yield p


def control(proxy: Mitmdump, path: str) -> str:
    with httpx.Client(proxy=proxy.url, timeout=10) as client:
        r = client.get(f"http://r4u-faults.test{path}")
    assert r.status_code == 200, r.text
    return r.text


def status(proxy: Mitmdump) -> dict[str, str]:
    return dict(item.split("=", 1) for item in control(proxy, "/status").split(", "))


def settled(proxy: Mitmdump, r4u) -> None:
    """Wait until the addon is done with every exchange made so far: no traced flow is open (a
    flow's trace is handed to the delivery in the hook that closes it), a sentinel exchange made
    after that reached R4U (the deliverer claims exchanges oldest first), and
    the outbox holds nothing more. Then nothing more of those exchanges can appear."""
    wait_for(lambda: status(proxy)["open"] == "0", what="no traced flow open")
    tag = uuid.uuid4().hex
    with make_client(proxy) as client:
        fetch(client, "chunk=7", test_id=uuid.uuid4().hex, tag=tag, body={"model": "gpt-4o-mini", "messages": []})
    traces_for(r4u, tag)
    wait_for(lambda: read_stats(proxy.outbox)["pending"] == 0, what="an empty outbox")


STREAM = "synth=12;chunk=random:5"  # 15 events, cut at random
HOOK = r"r4u-mitm: internal error in {hook} \(flow ([0-9a-f-]{{36}})\): RuntimeError\('injected fault: {fault}'\)"
STORE = (r"r4u-mitm: error building a trace record \(trace ([0-9a-f-]{{36}})\) \(\d+ so far; kept raw in the "
         r"dead-letter table of [^)]*\): RuntimeError: injected fault: {fault}")
PARSE = r"r4u-mitm: internal error reading the response of trace ([0-9a-f-]{36})"

# fault -> (log line pattern, which requests it hits, status counter, what R4U gets)
FAULT_CASES = {
    # Hooks: caught by the addon's boundary, logged with the flow id, counted as internal_errors.
    # (match: the flow goes untraced, its X-R4U-* tags already taken out; tap_init: the
    # stream still streams to the app, untapped, so its trace says the body was not kept.)
    "match": (HOOK.format(hook="requestheaders", fault="match"), "both", "internal_errors", "nothing"),
    "tap_init": (HOOK.format(hook="responseheaders", fault="tap_init"), "stream", "internal_errors", "not_kept"),
    "freeze": (HOOK.format(hook="response", fault="freeze"), "both", "internal_errors", "nothing"),
    "submit": (HOOK.format(hook="response", fault="submit"), "both", "internal_errors", "nothing"),
    # The deliverer: it logs and counts a record it could not build (record_errors), and keeps the
    # raw exchange in the dead-letter table.
    "build_record": (STORE.format(fault="build_record"), "both", "record_errors", "nothing"),
    # Parsing: the record is kept without its summary (metadata.parse_error), logged with the trace id.
    "sse_feed": (PARSE, "stream", None, "parse_error"),
    "fast_read": (PARSE, "stream", None, "parse_error"),
    "stream_summary": (PARSE, "stream", None, "parse_error"),
    "body_summary": (PARSE, "json", None, "parse_error"),
}


def run_both(proxy: Mitmdump, upstream, tag: str) -> list[tuple[str, bytes, dict]]:
    """A streamed and a JSON chat request through `proxy`; each with what the upstream sent."""
    out = []
    with make_client(proxy) as client:
        for kind, x_fake, body in (("stream", STREAM, None),
                                   ("json", "chunk=7", {"model": "gpt-4o-mini", "messages": []})):
            test_id = uuid.uuid4().hex
            status_code, _, _, raw = fetch(client, x_fake, test_id=test_id, tag=tag, body=body)
            sent = upstream_record(upstream, test_id)
            assert status_code == sent["status"] == 200
            out.append((kind, raw, sent))
    return out


@pytest.mark.parametrize("fault", list(FAULT_CASES))
def test_a_fault_in_the_addon_never_reaches_the_client(faulty, upstream, r4u, fault):
    pattern, hits, counter, outcome = FAULT_CASES[fault]
    before_log, before = len(faulty.log()), status(faulty)
    tag = uuid.uuid4().hex
    assert control(faulty, f"/fault/{fault}") == f"ok {fault}"
    try:
        results = run_both(faulty, upstream, tag)
    finally:
        control(faulty, "/fault/none")

    for _, raw, sent in results:  # byte for byte what the upstream sent
        assert raw == sent["response_body"] and sent["complete"]

    expected = 2 if hits == "both" else 1

    def lines() -> list[str]:
        return re.findall(pattern, faulty.log()[before_log:])

    wait_for(lambda: len(lines()) >= expected, what=f"{expected} log line(s) matching {pattern}")
    settled(faulty, r4u)  # and no more than that
    found = lines()
    assert len(found) == expected, found  # once per affected flow
    if "(" in pattern.replace(r"\(", ""):  # the line names the flow (hooks) or the trace (parsing)
        assert len(set(found)) == expected
    after = status(faulty)
    if counter:
        assert int(after[counter]) - int(before[counter]) == expected
    other = {"internal_errors", "record_errors"} - {counter}
    assert all(after[c] == before[c] for c in other)

    if outcome == "nothing":
        assert [t for t in r4u.received if t["metadata"].get("properties", {}).get("test") == tag] == []
        return
    traces = {("stream" if t["metadata"]["stream"] else "json"): t for t in traces_for(r4u, tag, 2)}
    for kind, _, sent in results:
        trace = traces[kind]
        if outcome == "not_kept" and kind == hits:
            assert trace["response"] == "" and trace["error"] == NOT_STORED
            continue
        assert trace["response"] == sent["response_body"].decode()
        if outcome == "parse_error" and kind == hits:
            assert trace["metadata"]["parse_error"].startswith("RuntimeError")
            assert trace["metadata"]["model"] is None and trace["metadata"]["stream_complete"] is None
            assert trace["metadata"]["trace_id"] in found
        else:
            assert "parse_error" not in trace["metadata"]
            assert trace["metadata"]["model"]
    assert traces["stream"]["metadata"]["events"] == (0 if outcome == "not_kept" else 15) or outcome == "parse_error"


def test_a_failing_tap_clock_never_reaches_the_client(faulty, upstream, r4u):
    """The tee swallows its own failure (an exception in a stream callable would drop the piece
    for the client): the client gets every byte; the trace keeps nothing of the body and says it
    is incomplete (truncated, completeness unknown) instead of blaming the upstream."""
    tag = uuid.uuid4().hex
    control(faulty, "/fault/tap_clock")
    try:
        results = run_both(faulty, upstream, tag)
    finally:
        control(faulty, "/fault/none")
    for _, raw, sent in results:
        assert raw == sent["response_body"]
    traces = {("stream" if t["metadata"]["stream"] else "json"): t for t in traces_for(r4u, tag, 2)}
    stream = traces["stream"]
    assert stream["metadata"]["truncated"] is True and stream["metadata"]["stream_complete"] is None
    assert stream["error"] is None and stream["response"] == ""
    assert json.loads(traces["json"]["response"])["object"] == "chat.completion"  # not teed: unaffected


def first_bytes_before_the_upstream_ends(proxy: Mitmdump, upstream) -> tuple[int, int]:
    """Read the first bytes of a slow stream (6 writes, 300 ms before each); return (writes the
    upstream had made when they arrived, writes in all). A stream passed on as it comes gets
    there after the first write; a buffered one only after the last."""
    test_id = uuid.uuid4().hex
    with make_client(proxy) as client, client.stream(
            "POST", CHAT_URL, json={"model": "gpt-4o-mini", "stream": True},
            headers={"x-fake": "synth=3;delay_ms=300", "x-test-id": test_id}) as r:
        pieces = r.iter_raw()
        next(pieces)
        rec = next(rec for rec in list(upstream.requests) if ("x-test-id", test_id) in rec["headers"])
        writes_then = rec["writes"]
        b"".join(pieces)
    return writes_then, upstream_record(upstream, test_id)["writes"]


def test_event_streams_stay_streamed(faulty, upstream):
    """The app gets the first event while the upstream is still sending: the addon tees, it
    never buffers."""
    seen, total = first_bytes_before_the_upstream_ends(faulty, upstream)
    assert total == 6 and seen < total


def test_event_streams_stay_streamed_when_the_tap_cannot_be_made(faulty, upstream):
    control(faulty, "/fault/tap_init")
    try:
        seen, total = first_bytes_before_the_upstream_ends(faulty, upstream)
    finally:
        control(faulty, "/fault/none")
    assert seen < total


def test_a_failing_tap_clock_is_logged_and_counted(faulty, upstream, r4u):
    before_log, before = len(faulty.log()), status(faulty)
    control(faulty, "/fault/tap_clock")
    try:
        run_both(faulty, upstream, uuid.uuid4().hex)
    finally:
        control(faulty, "/fault/none")
    settled(faulty, r4u)
    assert "injected fault: tap_clock" in faulty.log()[before_log:]
    assert int(status(faulty)["internal_errors"]) == int(before["internal_errors"]) + 1


def test_a_record_that_cannot_be_built_is_logged_with_its_id(faulty, upstream, r4u):
    before_log = len(faulty.log())
    control(faulty, "/fault/build_record")
    try:
        with make_client(faulty) as client:
            fetch(client, STREAM, test_id=uuid.uuid4().hex)
    finally:
        control(faulty, "/fault/none")
    line = wait_for(lambda: re.search(r".*error building a trace record.*", faulty.log()[before_log:]),
                    what="the log line").group(0)
    assert re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", line)
