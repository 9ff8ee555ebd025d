"""fastpath.py: the fast reading of chat streams gives the same record as the full reading.

The full reading (BodyDecoder + SSEDecoder + StreamSummary, piece by piece) is the oracle: every
record here is built both ways and compared whole (events, ttft_ms, stream_complete, error,
model, finish_reason, usage, the response text, ...). Other tests check that the fast reading is
taken where it should be, and left where it must be.
"""

from __future__ import annotations

import gzip
import json
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4u_mitm.pure import dialects, fastpath, record
from r4u_mitm.pure.record import Exchange, build_record
from tests.harness import STREAMS
from tests.test_dialects import AZURE_PATH, CHAT_PATH, COMPLETIONS_PATH, WHERE
from tests.test_dialects import streams as provider_streams

PLACES = {**WHERE, "framing": WHERE["openai_chat"]}
EXAMPLES = sorted(str(p.relative_to(STREAMS)) for p in STREAMS.rglob("*.sse"))
FAST_DIALECTS = ("openai_chat", "azure_chat", "openai_completions")
# Framing the fast reading leaves to the full one: a CR, a BOM, fields other than data, multi-line events.
FRAMING_FALLBACKS = {
    "framing/bom.sse", "framing/cr_only.sse", "framing/crlf.sse", "framing/event_only_and_id_blank.sse",
    "framing/mixed_line_endings.sse", "framing/multiline_data.sse",
}
CHAT_PLACES = [WHERE["openai_chat"], WHERE["azure_chat"], ("openai_compatible", CHAT_PATH),
               WHERE["openai_completions"]]
BIG = 1 << 30


def place_of(name: str) -> tuple[str, str]:
    return PLACES[name.split("/")[0]]


def raw_of(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


def exchange(provider: str, path: str, pieces: list[bytes], *, encoding: str | None = None,
             times: bool = True, **kw) -> Exchange:
    headers = [("content-type", "text/event-stream; charset=utf-8")]
    if encoding:
        headers.append(("content-encoding", encoding))
    return Exchange(
        trace_id="t-fast", provider=provider, url=f"https://api.example.com{path}", method="POST", path=path,
        request_headers=[("content-type", "application/json")], request_body=b'{"stream":true}',
        started_wall=1_700_000_000.0, started=100.0, ended=105.0, status_code=200, response_headers=headers,
        headers_at=100.1, stream=True, pieces=pieces,
        piece_times=[100.2 + i * 0.01 for i in range(len(pieces) if times else len(pieces) - 1)],
        wire_bytes=sum(map(len, pieces)), **kw,
    )


def cut(raw: bytes, cuts) -> list[bytes]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(raw)), len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def full_record(ex: Exchange, limit: int = BIG) -> dict:
    with mock.patch.object(record, "_read_stream_fast", lambda *args: None):
        return build_record(ex, max_body_bytes=limit)


def same_record(ex: Exchange, limit: int = BIG) -> dict:
    """The record, built fast (if it applies) and fully: they must be equal."""
    fast = build_record(ex, max_body_bytes=limit)
    assert fast == full_record(ex, limit)
    return fast


def fast_read(raw: bytes, place=WHERE["openai_chat"], encoding: str | None = None, limit: int = BIG):
    return fastpath.read_stream(*place, encoding, raw, limit, [len(raw)], [1.0])


def applies(raw: bytes, place=WHERE["openai_chat"], **kw) -> bool:
    return fast_read(raw, place, **kw) is not None


# ---------------------------------------------------------------------------------------------
# The example streams


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_streams_same_record(name):
    raw = raw_of(name)
    for pieces in ([raw], cut(raw, range(7, len(raw), 7)), cut(raw, range(1, len(raw)))):
        same_record(exchange(*place_of(name), pieces))
    same_record(exchange(*place_of(name), cut(raw, range(5, len(raw), 5)), times=False))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_streams_take_the_fast_reading_where_they_should(name):
    fast = name.split("/")[0] in FAST_DIALECTS or (name.startswith("framing/") and name not in FRAMING_FALLBACKS)
    assert applies(raw_of(name), place_of(name)) is fast


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n.split("/")[0] in FAST_DIALECTS])
def test_example_streams_cut_anywhere_or_capped(name):
    raw = raw_of(name)
    for end in range(0, len(raw) + 1, max(1, len(raw) // 97)):
        same_record(exchange(*place_of(name), cut(raw[:end], range(11, end, 11))))
        same_record(exchange(*place_of(name), cut(raw, range(11, len(raw), 11))), limit=max(1, end))


# ---------------------------------------------------------------------------------------------
# Properties: any stream the strategies make, any pieces, any cap


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_example_streams_any_pieces_any_cap_same_record(data):
    name = data.draw(st.sampled_from(EXAMPLES))
    raw = raw_of(name)
    raw = raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw
    pieces = cut(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=40)))
    limit = data.draw(st.one_of(st.just(BIG), st.integers(1, len(raw) + 2)))
    with mock.patch.object(fastpath, "WINDOW", data.draw(st.sampled_from([1, 64, 1000, fastpath.WINDOW]))):
        same_record(exchange(*place_of(name), pieces, times=data.draw(st.booleans())), limit)


def sse_bytes(events, space: bool) -> bytes:
    """Events as a server would write them (LF line endings)."""
    out = []
    for event in events:
        if event.event != "message":
            out.append(f"event: {event.event}\n")
        out += [f"data:{' ' if space else ''}{line}\n" for line in event.data.split("\n")]
        out.append("\n")
    return "".join(out).encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=provider_streams(), data=st.data())
def test_provider_strategy_streams_same_record(stream, data):
    """The events test_dialects makes of every dialect (real ones mutated, and garbage)."""
    provider, path, events = stream
    raw = sse_bytes(events, data.draw(st.booleans()))
    pieces = cut(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=20)))
    with mock.patch.object(fastpath, "WINDOW", data.draw(st.sampled_from([1, 200, fastpath.WINDOW]))):
        same_record(exchange(provider, path, pieces))


ERROR = b'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
WORDS = b'data: {"choices":[{"index":0,"delta":{"content":"say \\"error\\": {\\"usage\\":{}} finish_reason\\""}}]}\n\n'
ROLE = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],'
        b'"usage":null}\n\n')
REASONING = b'data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"thinking"}}]}\n\n'
# Events that change a chat summary, or look as if they might, and framing the fast reading must
# notice; inserted between the events of the example chat streams.
SPICE = [
    b": keep-alive\n\n",
    ERROR,
    b'data: {"\\u0065rror":{"message":"escaped key"}}\n\n',
    b'data: {"error":null,"choices":[]}\n\n',
    b'data: {"error":"","choices":[]}\n\n',
    b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason" : "tool_calls"}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_re\\u0061son":"content_filter"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n',
    b'data: {"usag\\u0065":{"total_tokens":7},"choices":[]}\n\n',
    b'data: {"usage": {"total_tokens":8}}\n\n',
    b'data: {"usage":{"total_tokens":9},"usage":null}\n\n',
    b'data: {"usage":null,"usage":{"total_tokens":10}}\n\n',
    b'data: {"model":"other-model","id":"x","choices":[{"index":0,"delta":{"content":"y"}}]}\n\n',
    WORDS,
    ROLE,
    REASONING,
    b'data:{"choices":[{"index":0,"delta":{"refusal":"no"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{}"}}]}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"function_call":{"name":"f","arguments":""}}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"audio":{"id":"a","transcript":"hi"}}}]}\n\n',
    b'data: {"choices":[{"index":0,"text":"hi","finish_reason":null}]}\n\n',
    b'data: {"object":"","model":"","choices":[{"index":0,"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
    b"data: [DONE] and more\n\n",
    b"data:\n\n",
    b"data:  {}\n\n",
    b"data: not json\n\n",
    b"data: [1, 2]\n\n",
    b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe\xf0\x9f"}}]}\n\n',
    b'data: {"a":1}\ndata: {"b":2}\n\n',
    b"event: error\ndata: {}\n\n",
    b": note\rdata: [DONE]\n\n",
    b"id: 3\n\n",
    b"\n",
    b"\r",
    b"\xef\xbb\xbf",
]
CHAT_EXAMPLES = [n for n in EXAMPLES if n.split("/")[0] in FAST_DIALECTS] + ["framing/comments_keepalive.sse"]


def blocks_of(raw: bytes) -> list[bytes]:
    parts = raw.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


@st.composite
def spiced_streams(draw):
    blocks = blocks_of(raw_of(draw(st.sampled_from(CHAT_EXAMPLES))))
    if draw(st.booleans()):  # the first output comes late: many events before it
        blocks = [ROLE, REASONING] * draw(st.integers(0, 30)) + blocks
    for _ in range(draw(st.integers(0, 6))):
        blocks.insert(draw(st.integers(0, len(blocks))), draw(st.sampled_from(SPICE)))
    if draw(st.booleans()):
        del blocks[draw(st.integers(0, len(blocks))):]
    return b"".join(blocks)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=spiced_streams(), place=st.sampled_from(CHAT_PLACES), data=st.data())
def test_spiced_chat_streams_same_record(raw, place, data):
    pieces = cut(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=30)))
    limit = data.draw(st.one_of(st.just(BIG), st.integers(1, len(raw) + 2)))
    with mock.patch.object(fastpath, "WINDOW", data.draw(st.sampled_from([1, 100, 2000, fastpath.WINDOW]))):
        same_record(exchange(*place, pieces), limit)


# ---------------------------------------------------------------------------------------------
# Cases, each taking the fast reading


BASIC = raw_of("openai_chat/basic.sse")
BASIC_MODEL = json.loads(BASIC.split(b"\n\n")[0][6:])["model"]


def fast_record(raw: bytes, place=WHERE["openai_chat"], **kw) -> dict:
    assert applies(raw, place)
    return same_record(exchange(*place, cut(raw, range(13, len(raw), 13)), **kw))["metadata"]


def test_a_long_stream_over_many_windows():
    blocks = blocks_of(BASIC)
    middle = blocks[2:-2] * 3000  # about 1.5 MB: several windows
    raw = b"".join([*blocks[:2], *middle, ERROR, *middle, *blocks[-2:]])
    assert len(raw) > 4 * fastpath.WINDOW
    meta = fast_record(raw)
    assert meta["events"] == raw.count(b"\n\n") and meta["stream_complete"] is True
    assert meta["model"] == BASIC_MODEL and meta["finish_reason"] == "stop"
    assert same_record(exchange(*WHERE["openai_chat"], [raw]))["error"] == "server_error: boom"


@pytest.mark.parametrize("space", [b" ", b""])
def test_few_events_are_parsed(space):
    """What makes it fast: of 12,000 events, those up to the first output and those at the end."""
    blocks = blocks_of(BASIC.replace(b"data: ", b"data:" + space))
    raw = b"".join([*blocks[:2], *blocks[2:-2] * 4000, *blocks[-2:]])
    given = []
    add = dialects.StreamSummary.add

    def counted(summary, event):
        given.append(event)
        return add(summary, event)

    with mock.patch.object(dialects.StreamSummary, "add", counted):
        summary, _ = fast_read(raw)
    assert summary.events > 12_000 and summary.complete and summary.finish_reason == "stop"
    assert len(given) <= 6


def test_error_payload_mid_stream():
    raw = raw_of("openai_chat/error_midstream.sse")
    assert applies(raw)
    rec = same_record(exchange(*WHERE["openai_chat"], cut(raw, range(9, len(raw), 9))))
    assert rec["error"].startswith("server_error: ") and rec["metadata"]["stream_complete"] is True


def test_truncated_stream_is_incomplete():
    end = BASIC.index(b"\n\n", len(BASIC) // 2) + 5  # inside an event
    meta = fast_record(BASIC[:end])
    assert meta["stream_complete"] is False and meta["events"] == BASIC[:end].count(b"\n\n")


def test_capped_body():
    ex = exchange(*WHERE["openai_chat"], cut(BASIC, range(13, len(BASIC), 13)))
    meta = same_record(ex, limit=len(BASIC) // 2)["metadata"]
    assert meta["truncated"] is True and meta["stream_complete"] is None


def test_n2_choices_finish_reason_of_index_0():
    raw = raw_of("openai_chat/n2_interleaved.sse")
    choices = [c for block in raw.split(b"\n\n") if block.startswith(b"data: {")
               for c in json.loads(block[6:])["choices"] if c["finish_reason"]]
    reasons = {c["index"]: c["finish_reason"] for c in choices}
    assert reasons[0] != reasons[1] and choices[-1]["index"] == 1  # index 1 finishes last, differently
    assert fast_record(raw)["finish_reason"] == reasons[0]


def test_tool_calls_count_as_output():
    raw = raw_of("openai_chat/tool_calls_parallel.sse")
    meta = fast_record(raw)
    assert meta["finish_reason"] == "tool_calls" and meta["ttft_ms"] is not None


def test_include_usage():
    meta = fast_record(raw_of("openai_chat/include_usage.sse"))
    assert meta["usage"]["total_tokens"] > 0


def test_completions_and_azure():
    assert fast_record(raw_of("openai_completions/logprobs_include_usage.sse"), WHERE["openai_completions"])["usage"]
    assert fast_record(raw_of("azure_chat/async_filter_annotations.sse"), WHERE["azure_chat"])["model"]


@pytest.mark.parametrize("usage", [
    b'{"usag\\u0065":{"total_tokens":7},"choices":[]}', b'{"usage": {"total_tokens":7}}',
    b'{"usage":{"total_tokens":7},"usage":null,"usage":{"total_tokens":7}}',
])
def test_usage_however_spelled(usage):
    raw = BASIC.replace(b"data: [DONE]", b"data: " + usage + b"\n\ndata: [DONE]")
    assert fast_record(raw)["usage"] == {"total_tokens": 7}


def test_words_in_content_are_not_keys():
    raw = BASIC.replace(b"data: [DONE]", WORDS + b"data: [DONE]")
    meta = fast_record(raw)
    assert meta["usage"] is None and meta["finish_reason"] == "stop"


def test_first_output_late_and_model_late():
    role = b'data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"hm"}}]}\n\n'
    first = b'data: {"model":"late","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    raw = role * 5000 + first + b"data: [DONE]\n\n"
    ends = []
    pieces = cut(raw, range(100, len(raw), 100))
    for p in pieces:
        ends.append((ends[-1] if ends else 0) + len(p))
    summary, at = fastpath.read_stream(*WHERE["openai_chat"], None, raw, BIG, ends, list(range(len(pieces))))
    assert (summary.events, summary.model, summary.complete) == (5002, "late", True)
    dispatch = len(raw) - len(b"data: [DONE]\n\n") - 1  # the LF that ends the output event
    assert at == next(i for i, end in enumerate(ends) if end > dispatch)
    fast_record(raw)


@pytest.mark.parametrize("place, delta", [
    (WHERE["openai_chat"], b'"delta":{"content":"Hi"}'),
    (WHERE["openai_chat"], b'"delta":{"refusal":"No"}'),
    (WHERE["openai_chat"], b'"delta":{"tool_calls":[{"index":0,"id":"c","function":{"name":"f"}}]}'),
    (WHERE["openai_chat"], b'"delta":{"function_call":{"name":"f","arguments":""}}'),
    (WHERE["openai_chat"], b'"delta":{"audio":{"id":"a","data":"AAAA"}}'),
    (WHERE["openai_chat"], b'"delta":{"audio":{"id":"a","transcript":"Hi"}}'),
    (WHERE["openai_completions"], b'"text":"Hi"'),
])
def test_each_kind_of_first_output(place, delta):
    quiet = (b'data: {"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null,'
             b'"tool_calls":null,"function_call":null,"audio":null},"text":"","finish_reason":null}]}\n\n')
    output = b'data: {"model":"m","choices":[{"index":0,' + delta + b',"finish_reason":null}]}\n\n'
    raw = quiet * 50 + output + quiet * 50 + b"data: [DONE]\n\n"
    with mock.patch.object(fastpath, "WINDOW", 500):
        meta = fast_record(raw, place)
    dispatch = len(quiet) * 50 + len(output) - 1  # the LF that ends the output event, in 13-byte pieces
    assert meta["ttft_ms"] == round((100.2 + dispatch // 13 * 0.01 - 100.0) * 1000, 3)


def test_first_output_time_is_the_piece_with_the_dispatching_lf():
    second_end = BASIC.index(b"\n\n", BASIC.index(b"\n\n") + 2)  # the first content delta
    pieces = [BASIC[: second_end + 1], BASIC[second_end + 1:]]  # its last LF starts the next piece
    ends = [len(pieces[0]), len(BASIC)]
    summary, at = fastpath.read_stream(*WHERE["openai_chat"], None, BASIC, BIG, ends, [7.0, 9.0])
    assert at == 9.0
    assert same_record(exchange(*WHERE["openai_chat"], pieces))["metadata"]["ttft_ms"] == 210.0  # 100.21 s


def test_keepalive_comments_and_no_space_after_colon():
    assert fast_record(raw_of("framing/comments_keepalive.sse"))["events"] == 3
    assert fast_record(BASIC.replace(b"data: ", b"data:"))["finish_reason"] == "stop"


def test_no_event_at_all():
    for raw in (b"", b": hello\n\n", b"data: {}", b"data: {}\n"):
        assert fast_record(raw)["events"] == 0


# ---------------------------------------------------------------------------------------------
# Fall-back cases: the full reading, the same record


@pytest.mark.parametrize("raw, why", [
    (BASIC.replace(b"\n", b"\r\n"), "CRLF"),
    (BASIC.replace(b"\n", b"\r"), "CR"),
    (BASIC + b"data: {}\r", "a CR in the unterminated tail"),
    (BASIC.replace(b"data: [DONE]", b": note\rdata: [DONE]"), "a CR inside a block"),
    (b"\xef\xbb\xbf" + BASIC, "BOM"),
    (BASIC.replace(b"data: [DONE]", b"event: done\ndata: [DONE]"), "an event name"),
    (BASIC.replace(b"data: [DONE]", b'data: {"a":\ndata: 1}\n\ndata: [DONE]'), "a multi-line event"),
    (BASIC.replace(b"data: [DONE]", b"id: 7\ndata: [DONE]"), "an id field"),
    (BASIC.replace(b"\n\ndata: [DONE]", b"\n\n\ndata: [DONE]"), "two blank lines"),
    (b"\n" + BASIC, "a leading blank line"),
    (BASIC.replace(b"data: [DONE]", b"data [DONE]"), "a data field without a colon"),
])
def test_framing_fallbacks(raw, why):
    assert not applies(raw), why
    same_record(exchange(*WHERE["openai_chat"], cut(raw, range(13, len(raw), 13))))


@pytest.mark.parametrize("name", ["openai_responses/text.sse", "anthropic/text.sse", "openai_responses/failed.sse"])
def test_other_dialects_fall_back(name):
    assert not applies(raw_of(name), place_of(name))
    assert not fastpath.applies(*place_of(name), None)


@pytest.mark.parametrize("encoding", ["gzip", "br", "gzip, identity", "compress"])
def test_content_codings_fall_back(encoding):
    assert not fastpath.applies(*WHERE["openai_chat"], encoding)
    body = gzip.compress(BASIC) if encoding.startswith("gzip") else BASIC
    same_record(exchange(*WHERE["openai_chat"], cut(body, range(50, len(body), 50)), encoding=encoding))


@pytest.mark.parametrize("encoding", [None, "", "identity", " Identity "])
def test_identity_is_no_coding(encoding):
    assert fastpath.applies(*WHERE["openai_chat"], encoding)
    same_record(exchange(*WHERE["openai_chat"], [BASIC], encoding=encoding))


def test_every_place_of_the_chat_dialects():
    for place in CHAT_PLACES[:3]:
        assert applies(BASIC, place)
    assert fastpath.applies("openai", AZURE_PATH, None) and fastpath.applies("openai", COMPLETIONS_PATH, None)
