"""The mitmweb view for event streams (`r4u_mitm.proxy.contentview`) and what the addon leaves on flows
for it (trace id comment, truncation mark, the teed pieces' arrival times). The real browser path
is in test_mitmweb_e2e."""

from __future__ import annotations

import json
import random
import re
import time
import zlib

import pytest
from mitmproxy import contentviews
from mitmproxy.contentviews import Metadata
from mitmproxy.flow import Error
from mitmproxy.test import taddons, tflow, tutils

from r4u_mitm.proxy import contentview
from r4u_mitm.proxy.contentview import NAME, VIEW, render
from tests.harness import STREAMS

PATHS = {  # example streams directory -> (provider, host, request path)
    "openai_chat": ("openai", "api.openai.com", "/v1/chat/completions"),
    "azure_chat": ("azure_openai", "res.openai.azure.com", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"),
    "openai_responses": ("openai", "api.openai.com", "/v1/responses"),
    "openai_completions": ("openai", "api.openai.com", "/v1/completions"),
    "anthropic": ("anthropic", "api.anthropic.com", "/v1/messages"),
}
EXAMPLES = sorted(f"{d}/{p.name}" for d in PATHS for p in (STREAMS / d).glob("*.sse"))
SSE = "text/event-stream"


# -- an oracle independent of assembly.assemble: read the files plainly -------------------------------


def payloads(raw: bytes) -> list[dict]:
    """Every JSON object on a `data:` line (all example payloads are one line)."""
    out = []
    for line in raw.decode("utf-8").split("\n"):
        if line.startswith("data:"):
            try:
                value = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


def expected(dialect: str, raw: bytes) -> dict:
    """texts: what the assembled result must show (message text, refusals, reasoning, summaries);
    args: parsed tool/function arguments; finish: the final finish/stop reason; total: total tokens."""
    texts: dict[object, str] = {}
    args: dict[object, str] = {}
    finish = total = None
    for d in payloads(raw):
        if dialect in ("openai_chat", "azure_chat", "openai_completions"):
            for c in d.get("choices") or []:
                i = c.get("index", 0)
                delta = c.get("delta") or {}
                for key in ("content", "refusal"):
                    if isinstance(delta.get(key), str):
                        texts[(i, key)] = texts.get((i, key), "") + delta[key]
                if isinstance(c.get("text"), str):
                    texts[(i, "text")] = texts.get((i, "text"), "") + c["text"]
                for tc in delta.get("tool_calls") or []:
                    key = (i, tc.get("index"))
                    args[key] = args.get(key, "") + ((tc.get("function") or {}).get("arguments") or "")
                finish = c.get("finish_reason") or finish
            total = (d.get("usage") or {}).get("total_tokens", total)
        elif dialect == "openai_responses":
            t = d.get("type", "")
            if t in ("response.output_text.delta", "response.reasoning_summary_text.delta", "response.refusal.delta"):
                key = (d.get("output_index"), t, d.get("summary_index"))
                texts[key] = texts.get(key, "") + d["delta"]
            elif t == "response.function_call_arguments.done":
                args[d.get("output_index")] = d["arguments"]
            elif t in ("response.completed", "response.incomplete", "response.failed"):
                r = d["response"]
                finish = (r.get("incomplete_details") or {}).get("reason") or r.get("status")
                total = (r.get("usage") or {}).get("total_tokens", total)
        else:  # anthropic
            t = d.get("type")
            if t == "content_block_delta":
                delta = d["delta"]
                if delta.get("type") in ("text_delta", "thinking_delta"):
                    key = (d["index"], delta["type"])
                    texts[key] = texts.get(key, "") + delta.get("text", delta.get("thinking", ""))
                elif delta.get("type") == "input_json_delta":
                    args[d["index"]] = args.get(d["index"], "") + delta["partial_json"]
            elif t == "message_delta":
                finish = (d.get("delta") or {}).get("stop_reason") or finish
    return {
        "texts": [t for t in texts.values() if t],
        "args": [json.loads(a) for a in args.values() if a],
        "finish": finish,
        "total": total,
    }


def result_section(text: str) -> str:
    """The rendering's assembled result: between its heading and the next section."""
    start = text.index("Assembled result")
    end = min(i for i in (text.find("─── Wire timing"), text.find("─── Events")) if i > 0)
    return text[start:end]


def assert_shows(section: str, text: str) -> None:
    for line in text.split("\n"):
        if line.strip():
            assert line in section, f"{line!r} not in the assembled result:\n{section}"


def sse_flow(directory: str, raw: bytes, **metadata):
    provider, host, path = PATHS[directory]
    flow = tflow.tflow(req=tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=path.encode()))
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream; charset=utf-8"),), content=raw)
    flow.metadata.update(metadata)
    return flow


def flow_metadata(flow) -> Metadata:
    return Metadata(flow=flow, content_type=SSE, http_message=flow.response)


# -- every example stream renders its result ------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_stream_renders_its_assembled_result(name):
    directory = name.split("/")[0]
    raw = (STREAMS / name).read_bytes()
    want = expected(directory, raw)
    assert want["texts"] or want["args"] or "error" in name  # the oracle found something to look for
    with_flow = render(raw, flow_metadata(sse_flow(directory, raw)))
    sniffed = render(raw, Metadata(content_type=SSE))
    for text in (with_flow, sniffed):
        section = result_section(text)
        for expected_text in want["texts"]:
            assert_shows(section, expected_text)
        for parsed in want["args"]:  # tool call arguments / tool inputs, parsed and pretty-printed
            assert_shows(section, json.dumps(parsed, indent=2, ensure_ascii=False))
        if want["finish"]:
            assert want["finish"] in section
        if want["total"] is not None:
            assert f"total_tokens: {want['total']}" in section
        assert f"─── Events ({len(payloads(raw)) + raw.count(b'[DONE]')}) ───" in text
    # The flow's path decides the dialect; without a flow the events say the same.
    assert result_section(with_flow) == result_section(sniffed)
    assert "guessed" not in with_flow.split("\n")[0] and "guessed" in sniffed.split("\n")[0]


def test_heading_says_what_the_flow_is_and_its_trace():
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    flow = sse_flow("openai_chat", raw, **{"r4u.trace_id": "1c2f3a4b-0000-4000-8000-000000000000"})
    text = render(raw, flow_metadata(flow))
    assert text.split("\n")[:4] == [
        "Chat Completions stream · openai · POST /v1/chat/completions",
        "r4u trace 1c2f3a4b-0000-4000-8000-000000000000",
        "complete · finish_reason stop · 10 events",
        "model gpt-4.1-nano-2025-04-14 · id chatcmpl-AiPmfvp4rrC39Cri9IeMvbuSSqHWI",
    ]


def test_error_and_unfinished_streams_say_so():
    raw = (STREAMS / "openai_chat/error_midstream.sse").read_bytes()
    text = render(raw, Metadata(content_type=SSE))
    assert "ended by a provider error" in text and "error: server_error: The server had an error" in text
    basic = (STREAMS / "openai_chat/basic.sse").read_bytes()
    cut = basic[: basic.rindex(b"data: [DONE]") + 7]  # ends inside the [DONE] event
    text = render(cut, Metadata(content_type=SSE))
    assert "INCOMPLETE: no terminal event" in text
    assert "note: the body ends inside an event" in text


def test_other_event_streams_are_shown_as_events_only():
    raw = b'event: update\ndata: {"build": 7, "state": "green"}\n\ndata: plain text\n\n'
    flow = tflow.tflow(req=tutils.treq(host="status.example.com", port=443, scheme=b"https", path=b"/live"))
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=raw)
    for metadata in (Metadata(content_type=SSE), flow_metadata(flow)):
        text = render(raw, metadata)
        assert text.split("\n")[0].startswith("Event stream") and "not recognised as an LLM API stream" in text
        assert "Assembled result" not in text
        assert '#1 update\n  {\n    "build": 7,' in text and "#2 message: plain text" in text


def test_events_are_listed_readably():
    raw = (STREAMS / "anthropic/text.sse").read_bytes()
    text = render(raw + b"event: custom\nid: 7\nretry: 100\ndata: not json\n\n", Metadata(content_type=SSE))
    events = text[text.index("─── Events"):]
    assert '#1 message_start\n  {\n    "type": "message_start",' in events
    assert "#10 custom · id 7 · retry 100: not json" in events


def timing_section(text: str) -> str:
    return text[text.index("─── Wire timing"):text.index("─── Events")]


def first_output_end(raw: bytes) -> int:
    """Oracle for a plain chat stream: the offset just past the first event whose delta has text."""
    offset = 0
    for block in raw.split(b"\n\n"):
        offset += len(block) + 2
        if block.startswith(b"data: {") and json.loads(block[6:])["choices"][0]["delta"].get("content"):
            return offset
    raise AssertionError("no output event")


def test_wire_timing_is_computed_from_the_flow():
    """ttfb and duration from mitmproxy's timestamps; the first token from the arrival of the
    teed piece that completed the first output event, even when pieces split events."""
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    flow = sse_flow("openai_chat", raw)  # tflow: request at 946681200, headers at +2 s, end at +3 s
    size = 7
    sizes = [len(raw[i:i + size]) for i in range(0, len(raw), size)]
    start, clock = flow.request.timestamp_start, 5000.0  # monotonic = wall - clock
    times = [start - clock + 2 + 0.001 * n for n in range(len(sizes))]
    flow.metadata["r4u.pieces"] = {"times": times, "sizes": sizes, "clock": clock, "started": start}
    text = render(raw, flow_metadata(flow))
    timing = timing_section(text)
    k = (first_output_end(raw) - 1) // size  # the piece holding the blank line that ends the event
    assert timing.split("\n")[1:6] == [
        "time to first byte (response headers): 2000 ms",
        f"time to first token (first output event): {2000 + k} ms",
        "duration (request start to last byte): 3000 ms",
        f"10 events · {len(raw)} bytes on the wire",
        "(request start = 0; first token: when the piece that completed it arrived)",
    ]
    assert text.index("Assembled result") < text.index("Wire timing") < text.index("─── Events")
    # The same stream gzip-compressed, one compressed piece per event: the pieces are what came.
    events = [block + b"\n\n" for block in raw.split(b"\n\n")[:-1]]
    gz = zlib.compressobj(wbits=31)
    pieces = [gz.compress(event) + gz.flush(zlib.Z_SYNC_FLUSH) for event in events]
    pieces[-1] += gz.flush()
    flow.response.headers["content-encoding"] = "gzip"
    flow.response.raw_content = b"".join(pieces)
    flow.metadata["r4u.pieces"] = {"times": [start + 0.5 + n for n in range(len(pieces))],
                                   "sizes": [len(p) for p in pieces], "clock": 0.0, "started": start}
    assert flow.response.content == raw
    timing = timing_section(render(raw, flow_metadata(flow)))
    assert "time to first token (first output event): 1500 ms" in timing  # the second event, in the second piece
    assert f"10 events · {len(flow.response.raw_content)} bytes on the wire" in timing


def test_wire_timing_without_piece_times_or_output():
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    unknown = "time to first token (first output event): not known (no arrival times of this body's pieces on the flow)"
    assert unknown in render(raw, flow_metadata(sse_flow("openai_chat", raw)))  # not traced, or saved without r4u
    start = sse_flow("openai_chat", raw).request.timestamp_start
    edited = sse_flow("openai_chat", raw, **{"r4u.pieces": {"times": [1.0], "sizes": [len(raw) - 1], "clock": 0,
                                                            "started": start}})
    assert unknown in render(raw, flow_metadata(edited))  # the body is not what was teed (edited in mitmweb)
    replayed = sse_flow("openai_chat", raw, **{"r4u.pieces": {"times": [1.0], "sizes": [len(raw)], "clock": 0,
                                                              "started": start - 60}})
    assert unknown in render(raw, flow_metadata(replayed))  # the pieces timed another exchange of this flow
    quiet = b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\ndata: [DONE]\n\n'
    flow = sse_flow("openai_chat", quiet, **{"r4u.pieces": {"times": [1.0], "sizes": [len(quiet)], "clock": 0,
                                                            "started": start}})
    assert "time to first token (first output event): none (no output event)" in render(quiet, flow_metadata(flow))
    other = b"data: plain\n\n"  # not an LLM stream: no first token to speak of
    flow = tflow.tflow(req=tutils.treq(host="status.example.com", port=443, scheme=b"https", path=b"/live"))
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=other)
    timing = timing_section(render(other, flow_metadata(flow)))
    assert "first token" not in timing and "1 event · 13 bytes on the wire" in timing
    assert "─── Wire timing ───\n1 event\n" in render(other, Metadata(content_type=SSE))  # no flow: no times


# -- bounded, and never raises ----------------------------------------------------------------------------


def test_many_events_are_capped_with_a_clear_line():
    n = contentview.MAX_EVENTS + 250
    raw = b"".join(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n' for _ in range(n))
    text = render(raw, Metadata(content_type=SSE))
    assert "x" * n in text  # the assembled text is whole
    assert f"#{contentview.MAX_EVENTS} message" in text and f"#{contentview.MAX_EVENTS + 1} " not in text
    assert text.rstrip().endswith("… 250 more events (not shown)")


def test_huge_bodies_are_read_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(contentview, "PARSE_LIMIT", 4096)
    event = b'data: {"choices":[{"index":0,"delta":{"content":"ab"}}]}\n\n'
    raw = event * 1000 + b'data: {"choices":[{"index":0,"delta":{"content":"' + b"y" * 50_000 + b'"}}]}\n\n'
    text = render(raw, Metadata(content_type=SSE))
    assert "only the first 4096 bytes of" in text and "complete: unknown" in text
    assert "the body beyond the first 4096 bytes was not read" in text
    assert "yyyy" not in text


def test_long_texts_are_cut(monkeypatch):
    long = "é" * (contentview.MAX_EVENT_CHARS * 3)
    raw = f'data: {{"choices":[{{"index":0,"delta":{{"content":"{long}"}}}}]}}\n\n'.encode()
    text = render(raw, Metadata(content_type=SSE))
    assert "more characters)" in text and len(text) < len(long) * 2


GARBAGE = [
    b"",
    b"\x00\xff\xfe" * 1000,
    b"\xc3\x28 data: \xe2\x28\xa1\n\n",
    b"data: " + b"[" * 100_000 + b"\n\n",
    b"data: " + b"{" * 50_000 + b"\n\n",
    b'data: {"choices": "nope", "usage": [1, 2], "error": {"message": {"deep": [null]}}}\n\n',
    b'data: {"choices":[{"index":"0","delta":{"tool_calls":[{"index":null,"function":{"arguments":7}}]}}]}\n\n',
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added","output_index":-1,"item":5}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\\"a\\":"}}\n\n',
    b"retry: x\nid: \x00\nevent\n:comment\ndata\n\n" * 3,
    b"data: [DONE]",
    "data: ünïcödé ✓\r\n\r\n".encode("utf-16"),
]


@pytest.mark.parametrize("data", GARBAGE + [random.Random(seed).randbytes(5000) for seed in range(5)])
def test_garbage_never_raises(data):
    odd_pieces = ({"times": "soon", "sizes": [len(data)], "clock": 0}, {"times": [None], "sizes": [len(data)], "clock": 0},
                  {"times": [1.0], "sizes": [float(len(data))], "clock": 0}, {"times": [], "sizes": [], "clock": "x"},
                  {"times": [1.0, 2.0], "sizes": [-1, len(data) + 1], "clock": 0}, {"times": [1.0], "clock": 0},
                  {"times": [1.0], "sizes": [len(data)], "clock": 0, "started": None}, [1, 2], None)
    for pieces in odd_pieces:
        if isinstance(pieces, dict) and "started" not in pieces:
            pieces["started"] = tutils.treq().timestamp_start  # as sse_flow's: the other oddities are reached
        flow = sse_flow("openai_chat", data, **{"r4u.pieces": pieces, "r4u.provider": 7, "r4u.truncated": "yes",
                                                "r4u.trace_id": 5})
        for metadata in (Metadata(content_type=SSE), flow_metadata(flow), Metadata(), None, object()):
            text = render(data, metadata)
            assert isinstance(text, str) and text and "could not render" not in text
            assert VIEW.prettify(data, metadata) == text
            assert isinstance(VIEW.render_priority(data, metadata), float)


def test_odd_inputs_never_raise():
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    for data in (memoryview(raw), bytearray(raw), None, "data: {}\n\n"):
        assert "stream" in render(data, Metadata(content_type=SSE))

    class Hostile:
        def __getattr__(self, name):
            raise RuntimeError("no")

    assert "Salut" in render(raw, Hostile())
    with_broken_flow = Metadata(flow=Hostile(), content_type=SSE)
    assert "Salut" in render(raw, with_broken_flow)


def test_a_body_that_did_not_decode_is_decoded_as_far_as_it_goes():
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    flow = sse_flow("openai_chat", b"")
    flow.response.headers["content-encoding"] = "br"
    flow.response.raw_content = b"\x00not brotli\x00" + raw
    text = render(flow.response.raw_content, flow_metadata(flow))
    assert "note: body did not decode as 'br'" in text


# -- picked for event streams, and only for them ------------------------------------------------------------


def test_priority_beats_every_built_in_view_for_event_streams_only():
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    contentview.register()
    others = [v for name, v in contentviews.registry.items() if name != NAME.lower()]
    meta = Metadata(content_type=SSE)
    assert VIEW.render_priority(raw, meta) > max(v.render_priority(raw, meta) for v in others)
    assert VIEW.render_priority(b"", meta) > 1
    for content_type, data in (("application/json", b'{"a": 1}'), ("text/plain", raw), ("image/png", b"\x89PNG"),
                               ("text/html", b"<html>"), (None, b"hello")):
        assert VIEW.render_priority(data, Metadata(content_type=content_type)) < 0
    # An event stream served without a content type: above raw (0.1), below any typed view (>= 1).
    assert 0.1 < VIEW.render_priority(raw, Metadata()) < 1


def test_registered_once_and_chosen_automatically_by_mitmproxy():
    assert contentview.register() and contentview.register()
    assert contentviews.registry[NAME] is VIEW
    assert contentviews.registry.available_views().count(NAME.lower()) == 1
    raw = (STREAMS / "openai_responses/text.sse").read_bytes()
    with taddons.context():
        flow = sse_flow("openai_responses", raw)
        result = contentviews.prettify_message(flow.response, flow)
    assert result.view_name == NAME
    assert "Mount Fuji is 3,776 m — Japan's highest." in result_section(result.text)


# -- what the addon leaves on flows ---------------------------------------------------------------------------


def streamed(t, raw: bytes, pieces: int = 4, error: str | None = None):
    flow = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                                       path=b"/v1/chat/completions"))
    flow.request.headers["host"] = "api.openai.com"
    flow.request.timestamp_start = time.time()  # stamped as mitmproxy does, on the clock the tap's times follow
    t.requestheaders(flow)
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=None,
                                 timestamp_start=time.time(), timestamp_end=None)
    t.responseheaders(flow)
    size = -(-len(raw) // pieces)
    for i in range(0, len(raw), size):
        assert flow.response.stream(raw[i:i + size]) == raw[i:i + size]
    if error is None:
        flow.response.stream(b"")
        flow.response.timestamp_end = time.time()
        t.response(flow)
    else:  # the client or the upstream ended it: mitmproxy calls `error` only
        flow.error = Error(error)
        t.error(flow)
    return flow


def test_addon_loads_the_view(tracer):
    assert contentviews.registry[NAME] is VIEW


def test_traced_flows_carry_what_the_view_computes_its_timing_from(tracer):
    """The addon leaves the trace id, the provider and the teed pieces (sizes, and a copy of the
    tap's list of arrival times, which the spool writer empties once stored); the view computes
    from them the timing the record has."""
    t, _ = tracer
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    flow = streamed(t, raw, pieces=10)
    trace_id = flow.metadata["r4u.trace_id"]
    assert flow.comment == f"r4u {trace_id[:8]} · pending"
    assert not flow.marked and "r4u.truncated" not in flow.metadata
    assert flow.metadata["r4u.provider"] == "openai"
    pieces = flow.metadata["r4u.pieces"]
    tap = flow.response.stream
    assert pieces["times"] == tap.times.tolist() and type(pieces["times"]) is list and len(tap.times) == 10
    assert pieces["started"] == flow.request.timestamp_start
    assert b"".join(raw[sum(pieces["sizes"][:n]):sum(pieces["sizes"][:n + 1])] for n in range(10)) == raw
    assert sum(pieces["sizes"]) == len(raw) == len(flow.response.raw_content)
    (record,) = t.link.writer.records
    meta = record["metadata"]
    text = render(flow.response.raw_content, flow_metadata(flow))
    assert f"r4u trace {trace_id}" in text and "Salut ! Comment ça va ? 🥐" in result_section(text)
    timing = timing_section(text)
    assert f"{meta['events']} events · {meta['response_bytes']} bytes on the wire" in timing
    for label, key in (("time to first byte", "ttfb_ms"), ("time to first token", "ttft_ms"),
                       ("duration", "duration_ms")):  # the same instants, measured by the same clocks
        shown = float(re.search(rf"{label} \(.*\): ([\d.]+) ms", timing).group(1))
        assert abs(shown - meta[key]) <= 0.5 + 1e-3, (label, shown, meta[key])  # the view rounds


def test_only_flows_someone_looks_at_keep_their_pieces(tmp_path):
    """mitmdump alone (no view, no save file): no body restored, no piece times kept."""
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer
    from tests.conftest import Spooled

    t = R4UTracer()
    with taddons.context(t) as tctx:
        tctx.configure(t, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        t.link.writer = Spooled()
        flow = streamed(t, (STREAMS / "openai_chat/basic.sse").read_bytes())
    assert flow.response.raw_content is None and "r4u.pieces" not in flow.metadata
    assert flow.metadata["r4u.provider"] == "openai"


@pytest.mark.parametrize("cut, complete", [(None, True), (-200, False)])
def test_streams_ended_by_an_error_still_show_what_arrived(tracer, cut, complete):
    """The openai SDK hangs up right after [DONE], often before the HTTP terminator: mitmproxy
    then calls `error`, not `response`. mitmweb must show the body all the same."""
    t, _ = tracer
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    sent = raw[:cut] if cut else raw
    flow = streamed(t, sent, error="Client disconnected.")
    assert flow.response.raw_content == sent
    text = render(flow.response.raw_content, flow_metadata(flow))
    status = text.split("\n")[2]
    assert status.startswith("complete ·") if complete else status.startswith("INCOMPLETE")
    assert "Salut ! Comment ça va" in result_section(text)
    error = t.link.writer.records[0]["error"]
    assert error is None if complete else error.startswith("client aborted after")


def test_flows_with_a_truncated_trace_are_marked(tracer):
    t, tctx = tracer
    tctx.configure(t, r4u_max_body_bytes=100)
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    flow = streamed(t, raw)
    assert flow.marked == ":warning:"
    assert flow.comment.startswith("r4u ") and flow.comment.endswith("· trace truncated")
    assert flow.metadata["r4u.truncated"] is True and "r4u.pieces" not in flow.metadata  # nothing restored
    assert t.link.writer.records[0]["metadata"]["truncated"] is True
    store = (STREAMS / "openai_chat/basic.sse").read_bytes()  # as mitmproxy keeps it with store_streamed_bodies
    flow.response.raw_content = store
    assert "the trace is truncated (r4u_max_body_bytes or r4u_memory_mb)" in timing_section(
        render(store, flow_metadata(flow)))
    from mitmproxy import flowfilter
    assert flowfilter.match("~marked", flow) and flowfilter.match("~comment truncated", flow)


def test_an_app_comment_is_kept(tracer):
    t, _ = tracer
    flow = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", path=b"/v1/models"))
    flow.request.headers["host"] = "api.openai.com"
    flow.comment = "mine"
    t.requestheaders(flow)
    assert flow.comment == "mine"


@pytest.mark.parametrize("max_body_bytes", [None, 100])  # the pieces kept for the view; the truncation said
def test_a_fault_while_annotating_never_loses_the_trace(tracer, max_body_bytes):
    t, tctx = tracer
    if max_body_bytes:
        tctx.configure(t, r4u_max_body_bytes=max_body_bytes)

    class Boom(dict):
        def __setitem__(self, key, value):
            raise RuntimeError("injected")

    flow = tflow.tflow(req=tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                                       path=b"/v1/chat/completions"))
    flow.request.headers["host"] = "api.openai.com"
    t.requestheaders(flow)
    flow.metadata = Boom(flow.metadata)
    flow.response = tutils.tresp(headers=((b"content-type", b"text/event-stream"),), content=None)
    t.responseheaders(flow)
    raw = (STREAMS / "openai_chat/basic.sse").read_bytes()
    for i in range(0, len(raw), 60):
        flow.response.stream(raw[i:i + 60])
    flow.response.stream(b"")
    t.response(flow)
    assert flow.response.stream.truncated is bool(max_body_bytes)
    assert t.link.internal_errors == 1 and len(t.link.writer.records) == 1
    assert t.link.writer.records[0]["response"] == (raw.decode() if max_body_bytes is None else raw[:100].decode())
