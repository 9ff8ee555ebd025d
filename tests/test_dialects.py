"""dialects.py: which dialect a request speaks, per-dialect stream semantics and body summaries.

Expectations for the example streams (tests/data/streams) were read off the files by hand, not taken
from this code's output. The example streams' helpers and the hypothesis strategies here also serve
test_assembly.py and test_fastpath.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4u_mitm.pure import dialects
from r4u_mitm.pure.dialects import StreamSummary, body_summary, dialect_for, stream_summary
from r4u_mitm.pure.sse import Event, SSEDecoder
from tests.harness import STREAMS

CHAT_PATH = "/v1/chat/completions"
AZURE_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
RESPONSES_PATH = "/v1/responses"
COMPLETIONS_PATH = "/v1/completions"
MESSAGES_PATH = "/v1/messages"

# directory -> (provider, path) used to read its streams
WHERE = {
    "openai_chat": ("openai", CHAT_PATH),
    "azure_chat": ("azure_openai", AZURE_PATH),
    "openai_responses": ("openai", RESPONSES_PATH),
    "openai_completions": ("openai", COMPLETIONS_PATH),
    "anthropic": ("anthropic", MESSAGES_PATH),
}


def raw_of(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


def decode(raw: bytes) -> list[Event]:
    dec = SSEDecoder()
    events = dec.feed(raw)
    events += dec.finish()
    return events


def events_of(name: str) -> list[Event]:
    return decode(raw_of(name))


def where(name: str) -> tuple[str, str]:
    return WHERE[name.split("/")[0]]


def summarize(provider: str, path: str, events: list[Event]) -> tuple[StreamSummary, int | None]:
    s = stream_summary(provider, path)
    first = None
    for i, ev in enumerate(events):
        if s.add(ev) and first is None:
            first = i
    return s, first


# ---------------------------------------------------------------------------------------------
# Dialects


@pytest.mark.parametrize(
    "provider, path, dialect",
    [
        ("openai", "/v1/chat/completions", "chat"),
        ("azure_openai", AZURE_PATH, "chat"),
        ("openai_compatible", "/chat/completions/", "chat"),
        ("openai", "/v1/embeddings", "chat"),
        ("openai", "/v1/responses", "responses"),
        ("openai", "/v1/responses/resp_123?stream=true&starting_after=3", "responses"),
        ("azure_openai", "/openai/v1/responses?api-version=preview", "responses"),
        ("openai", "/v1/completions", "completions"),
        ("azure_openai", "/openai/deployments/instruct/completions?api-version=2024-10-21", "completions"),
        ("anthropic", "/v1/messages", "anthropic"),
        ("anthropic", "/v1/complete", "anthropic"),
        ("openai_compatible", "/anthropic/v1/messages", "anthropic"),
    ],
)
def test_dialect_for(provider, path, dialect):
    assert dialect_for(provider, path) == dialect
    assert stream_summary(provider, path).dialect == dialect


# ---------------------------------------------------------------------------------------------
# The example streams, read by hand


def chat_usage(prompt: int, completion: int, total: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def responses_usage(inp: int, out: int, total: int, reasoning: int = 0) -> dict:
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": 0},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": total,
    }


def anthropic_usage(inp: int, out: int) -> dict:
    # message_start's usage, with message_delta's cumulative output_tokens merged in
    return {
        "input_tokens": inp,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": out,
        "service_tier": "standard",
    }


CHAT_ERROR = (
    "server_error: The server had an error processing your request. Sorry about that! You can retry your "
    "request, or contact us through our help center at help.openai.com if you keep seeing this error. (Please "
    "include the request ID req_dc966cdd8308ea65a14d15727aa66447 in your email.)"
)
FAILED_ERROR = (
    "server_error: An error occurred while processing your request. You can retry your request, or "
    "contact us through our help center at help.openai.com if the error persists. Please include the "
    "request ID req_a34464fcd4daa65383924203aea3debd in your message."
)
RATE_ERROR = (
    "rate_limit_exceeded: Rate limit reached for gpt-4o in organization org-IBnwB9sk6ivbRlUD2h91OjOc "
    "on tokens per min (TPM): Limit 450000, Used 449120, Requested 2216. Please try again in 178ms. "
    "Visit https://platform.openai.com/account/rate-limits to learn more."
)

# name: (events, complete, error, model, finish_reason, usage, index of first output event)
EXPECTED = {
    "openai_chat/basic.sse": (10, True, None, "gpt-4.1-nano-2025-04-14", "stop", None, 1),
    "openai_chat/include_usage.sse": (9, True, None, "gpt-4o-2024-11-20", "stop", chat_usage(19, 7, 26), 1),
    "openai_chat/n2_interleaved.sse": (
        16, True, None, "gpt-4.1-mini-2025-04-14", "length", chat_usage(14, 10, 24), 1,
    ),
    "openai_chat/tool_calls_parallel.sse": (
        20, True, None, "gpt-4o-2024-08-06", "tool_calls", chat_usage(112, 41, 153), 1,
    ),
    "openai_chat/refusal.sse": (10, True, None, "gpt-4o-2024-11-20", "stop", None, 1),
    "openai_chat/logprobs.sse": (8, True, None, "gpt-4.1-nano-2025-04-14", "stop", None, 1),
    "openai_chat/error_midstream.sse": (6, True, CHAT_ERROR, "gpt-4o-mini-2024-07-18", None, None, 1),
    "azure_chat/content_filter_results.sse": (
        10, True, None, "gpt-4o-mini-2024-07-18", "stop",
        {
            "completion_tokens": 6,
            "completion_tokens_details": {
                "accepted_prediction_tokens": 0,
                "audio_tokens": 0,
                "reasoning_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
            "prompt_tokens": 15,
            "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
            "total_tokens": 21,
        },
        2,
    ),
    "azure_chat/content_filter_blocked.sse": (7, True, None, "gpt-4o-mini-2024-07-18", "content_filter", None, 2),
    "azure_chat/async_filter_annotations.sse": (12, True, None, "gpt-4o-mini-2024-07-18", "stop", None, 2),
    "openai_responses/text.sse": (
        15, True, None, "gpt-4o-2024-08-06", "completed", responses_usage(16, 12, 28), 4,
    ),
    "openai_responses/function_calls.sse": (
        19, True, None, "gpt-4.1-mini-2025-04-14", "completed", responses_usage(58, 34, 92), 3,
    ),
    "openai_responses/reasoning_summary.sse": (
        25, True, None, "o3-2025-04-16", "completed", responses_usage(13, 180, 193, 160), 18,
    ),
    "openai_responses/incomplete.sse": (
        17, True, None, "gpt-4.1-2025-04-14", "max_output_tokens", responses_usage(11, 16, 27), 4,
    ),
    "openai_responses/failed.sse": (8, True, FAILED_ERROR, "gpt-4o-2024-11-20", "failed", None, 4),
    "openai_responses/error_event_flat.sse": (2, True, RATE_ERROR, "gpt-4o-2024-08-06", None, None, None),
    "openai_responses/error_event_nested.sse": (
        3, True, "too_many_requests: Too Many Requests", "gpt-4.1-nano-2025-04-14", None, None, None,
    ),
    "openai_completions/basic.sse": (8, True, None, "davinci-002", "length", None, 0),
    "openai_completions/logprobs_include_usage.sse": (
        5, True, None, "babbage-002", "stop",
        {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}, 0,
    ),
    "anthropic/text.sse": (9, True, None, "claude-sonnet-4-20250514", "end_turn", anthropic_usage(12, 17), 3),
    "anthropic/tool_use.sse": (
        14, True, None, "claude-opus-4-1-20250805", "tool_use", anthropic_usage(538, 64), 3,
    ),
    "anthropic/thinking.sse": (
        13, True, None, "claude-3-7-sonnet-20250219", "end_turn", anthropic_usage(44, 39), 8,
    ),
    "anthropic/error_overloaded.sse": (
        6, True, "overloaded_error: Overloaded", "claude-haiku-4-5-20251001", None, anthropic_usage(21, 1), 3,
    ),
}

ALL_STREAMS = sorted(EXPECTED)


def test_every_example_stream_has_an_expectation():
    on_disk = {
        f"{d}/{p.name}" for d in WHERE for p in (STREAMS / d).glob("*.sse")
    }
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_example_stream_summary(name):
    n, complete, error, model, finish_reason, usage, first = EXPECTED[name]
    s, first_output = summarize(*where(name), events_of(name))
    assert s.events == n
    assert s.complete is complete
    assert s.error == error
    assert s.model == model
    assert s.finish_reason == finish_reason
    assert s.usage == usage
    assert first_output == first


def test_provider_does_not_change_chat_semantics():
    # Azure frames are recognised by their shape, not by the provider name
    for provider in ("openai", "azure_openai", "openai_compatible"):
        s, first = summarize(provider, CHAT_PATH, events_of("azure_chat/content_filter_results.sse"))
        assert (s.model, s.finish_reason, first) == ("gpt-4o-mini-2024-07-18", "stop", 2)


# ---------------------------------------------------------------------------------------------
# Truncated streams


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_cut_at_every_event_boundary_is_incomplete(name):
    provider, path = where(name)
    events = events_of(name)
    for k in range(len(events)):  # the last event is the terminal one in every example
        s, _ = summarize(provider, path, events[:k])
        assert s.complete is False, k
        assert s.events == k


def cuts(raw: bytes) -> tuple[list[int], int]:
    """Offsets that cut a stream short (every 53rd byte, and each byte around its terminal event),
    and the offset at which its terminal event is dispatched."""
    body = raw.rstrip(b"\n")
    done_at = len(body) + 2  # the terminal event is dispatched by the blank line after it
    last_start = body.rfind(b"\n\n") + 2
    return sorted(set(range(0, done_at, 53)) | set(range(last_start - 2, done_at))), done_at


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_cut_inside_the_bytes_is_incomplete(name):
    provider, path = where(name)
    raw = raw_of(name)
    offsets, done_at = cuts(raw)
    for off in offsets:
        s, _ = summarize(provider, path, decode(raw[:off]))
        assert s.complete is False, off
    s, _ = summarize(provider, path, decode(raw[:done_at]))
    assert s.complete is True


# ---------------------------------------------------------------------------------------------
# Rules not covered by the example files


def chunk(choices: list, **extra) -> Event:
    return Event(data=json.dumps({"object": "chat.completion.chunk", "model": "m", "choices": choices, **extra}))


def test_chat_finish_reason_prefers_index_0():
    s = stream_summary("openai", CHAT_PATH)
    s.add(chunk([{"index": 1, "delta": {}, "finish_reason": "stop"}]))
    assert s.finish_reason == "stop"  # the first one seen, while index 0 has none
    s.add(chunk([{"index": 0, "delta": {}, "finish_reason": "length"}]))
    assert s.finish_reason == "length"
    s.add(chunk([{"index": 2, "delta": {}, "finish_reason": "content_filter"}]))
    assert s.finish_reason == "length"


def azure_frame_then_output() -> list[Event]:
    """An Azure annotation frame that holds what would count in a chunk, then a plain chunk."""
    frame = {
        "object": "", "id": "", "model": "", "created": 0,
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "content_filter",
                     "content_filter_results": {}}],
        "usage": {"total_tokens": 1},
    }
    return [Event(data=json.dumps(frame)), chunk([{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}])]


def test_azure_frames_are_ignored_whatever_they_hold():
    s, first = summarize("azure_openai", AZURE_PATH, azure_frame_then_output())
    assert (first, s.finish_reason, s.usage, s.model) == (1, None, None, "m")


def test_chat_usage_is_the_last_non_null_one():
    s = stream_summary("openai", CHAT_PATH)
    s.add(chunk([], usage={"total_tokens": 1}))
    s.add(chunk([], usage=None))
    assert s.usage == {"total_tokens": 1}
    s.add(chunk([], usage={"total_tokens": 2}))
    assert s.usage == {"total_tokens": 2}


def test_chat_output_carrying_deltas():
    cases = [
        ({"role": "assistant", "content": "", "refusal": None}, False),
        ({"content": ""}, False),
        ({"content": "x"}, True),
        ({"refusal": ""}, False),
        ({"refusal": "no"}, True),
        ({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}, True),
        ({"tool_calls": []}, False),
        ({"function_call": {"name": "f", "arguments": ""}}, True),
        ({"audio": {"id": "audio_1"}}, False),
        ({"audio": {"transcript": "hi"}}, True),
        ({}, False),
    ]
    for delta, carries in cases:
        s = stream_summary("openai", CHAT_PATH)
        assert s.add(chunk([{"index": 0, "delta": delta, "finish_reason": None}])) is carries, delta


def test_chat_error_payload_then_done():
    s = stream_summary("openai_compatible", CHAT_PATH)
    s.add(Event(data='{"error": {"message": "boom", "code": 500}}'))
    assert (s.complete, s.error) == (True, "500: boom")
    s.add(Event(data="[DONE]"))
    assert (s.complete, s.error, s.events) == (True, "500: boom", 2)


@pytest.mark.parametrize(
    "error, text",
    [
        ({"message": "m", "type": "t", "code": "c"}, "t: m"),
        ({"message": "m", "code": "c"}, "c: m"),
        ({"message": "m"}, "m"),
        ({"type": "t"}, "t"),
        ({"type": "error", "code": "rate_limit_exceeded", "message": "slow"}, "rate_limit_exceeded: slow"),
        ("plain text", "plain text"),
        ({"x": 1}, "error"),
        (True, "error"),
        ({"message": "x" * 5000}, "x" * 499 + "…"),
    ],
)
def test_error_text(error, text):
    s = stream_summary("openai", CHAT_PATH)
    s.add(Event(data=json.dumps({"error": error})))
    assert s.error == text


def test_invalid_json_is_counted_and_ignored():
    for provider, path in WHERE.values():
        s = stream_summary(provider, path)
        for data in ("{not json", "", "[1, 2", "null", "42", '"str"', "[]", "[" * 5000):
            assert s.add(Event(event="error", data=data)) is False
        assert (s.events, s.complete, s.error, s.model) == (8, False, None, None)


def test_an_event_error_without_an_error_key_in_chat():
    s = stream_summary("openai_compatible", CHAT_PATH)
    s.add(Event(event="error", data='{"message": "upstream timeout"}'))
    assert (s.complete, s.error) == (True, "upstream timeout")


def test_responses_dispatch_falls_back_on_the_event_name():
    s = stream_summary("openai", RESPONSES_PATH)
    assert s.add(Event(event="response.output_text.delta", data='{"delta": "hi"}')) is True
    assert s.add(Event(event="response.output_text.delta", data='{"delta": ""}')) is False
    s.add(Event(event="response.completed", data='{"response": {"status": "completed", "model": "m"}}'))
    assert (s.complete, s.finish_reason, s.model) == (True, "completed", "m")


def test_responses_type_wins_over_the_event_name():
    s = stream_summary("openai", RESPONSES_PATH)
    assert s.add(Event(event="message", data='{"type": "response.refusal.delta", "delta": "no"}')) is True
    assert s.add(Event(event="response.completed", data='{"type": "response.in_progress"}')) is False
    assert s.complete is False


def test_anthropic_ping_and_padding():
    s = stream_summary("anthropic", MESSAGES_PATH)
    assert s.add(Event(event="ping", data='{"type": "ping"}')) is False
    assert s.add(Event(event="content_block_start", data='{"type":"content_block_start","index":0,'
                       '"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}      ')) is True
    assert s.add(Event(event="content_block_delta", data='{"type":"content_block_delta","index":0,'
                       '"delta":{"type":"input_json_delta","partial_json":""}}   ')) is False
    assert s.add(Event(event="message_stop", data='{"type":"message_stop"            }')) is False
    assert (s.events, s.complete) == (4, True)


def test_anthropic_usage_merge_keeps_values_and_ignores_nulls():
    s = stream_summary("anthropic", MESSAGES_PATH)
    s.add(Event(data=json.dumps({"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}})))
    s.add(Event(data=json.dumps({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 9, "input_tokens": None}})))
    assert s.usage == {"input_tokens": 5, "output_tokens": 9}
    assert s.finish_reason == "max_tokens"


# ---------------------------------------------------------------------------------------------
# body_summary


BODIES = [
    (
        {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
        {"model": "gpt-4o-2024-08-06", "finish_reason": "stop",
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "error": None},
    ),
    (
        {"object": "chat.completion", "model": "m", "choices": [
            {"index": 1, "finish_reason": "stop"}, {"index": 0, "finish_reason": "length"}]},
        {"model": "m", "finish_reason": "length", "usage": None, "error": None},
    ),
    (
        {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1", "output": [],
         "incomplete_details": None, "error": None, "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}},
        {"model": "gpt-4.1", "finish_reason": "completed",
         "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}, "error": None},
    ),
    (
        {"object": "response", "status": "incomplete", "model": "gpt-4.1",
         "incomplete_details": {"reason": "max_output_tokens"}, "error": None},
        {"model": "gpt-4.1", "finish_reason": "max_output_tokens", "usage": None, "error": None},
    ),
    (
        {"object": "response", "status": "failed", "model": "gpt-4.1",
         "error": {"code": "server_error", "message": "oops"}},
        {"model": "gpt-4.1", "finish_reason": "failed", "usage": None, "error": "server_error: oops"},
    ),
    (
        {"id": "cmpl-1", "object": "text_completion", "model": "gpt-3.5-turbo-instruct",
         "choices": [{"text": "x", "index": 0, "logprobs": None, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
        {"model": "gpt-3.5-turbo-instruct", "finish_reason": "length",
         "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}, "error": None},
    ),
    (
        {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
         "model": "text-embedding-3-small", "usage": {"prompt_tokens": 8, "total_tokens": 8}},
        {"model": "text-embedding-3-small", "finish_reason": None,
         "usage": {"prompt_tokens": 8, "total_tokens": 8}, "error": None},
    ),
    (
        {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
         "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
         "usage": {"input_tokens": 10, "output_tokens": 2}},
        {"model": "claude-sonnet-4-5", "finish_reason": "end_turn",
         "usage": {"input_tokens": 10, "output_tokens": 2}, "error": None},
    ),
    (
        {"object": "list", "data": [{"id": "gpt-4o", "object": "model", "created": 1, "owned_by": "system"}]},
        {"model": None, "finish_reason": None, "usage": None, "error": None},
    ),
    (
        {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                   "param": None, "code": "invalid_api_key"}},
        {"model": None, "finish_reason": None, "usage": None,
         "error": "invalid_request_error: Incorrect API key provided"},
    ),
    (
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {"model": None, "finish_reason": None, "usage": None, "error": "overloaded_error: Overloaded"},
    ),
]


@pytest.mark.parametrize("body, expected", BODIES)
def test_body_summary(body, expected):
    assert body_summary("openai", "/v1/whatever", json.dumps(body)) == expected


@pytest.mark.parametrize("body", ["", "not json", "<html>502 Bad Gateway</html>", "[]", "null", "3", '"x"', "[" * 5000])
def test_body_summary_of_non_objects(body):
    assert body_summary("openai", CHAT_PATH, body) == {
        "model": None, "finish_reason": None, "usage": None, "error": None,
    }


# ---------------------------------------------------------------------------------------------
# Garbage never raises


KEYS = [
    "choices", "delta", "content", "refusal", "tool_calls", "function", "function_call", "arguments", "name",
    "id", "index", "finish_reason", "usage", "model", "object", "error", "type", "message", "code", "role",
    "response", "status", "output", "item", "output_index", "content_index", "summary_index", "part", "text",
    "item_id", "incomplete_details", "reason", "content_block", "partial_json", "stop_reason", "stop_sequence",
    "thinking", "signature", "input", "summary", "audio", "data", "transcript", "reasoning_content", "call_id",
]
TYPES = [
    "error", "ping", "message_start", "message_delta", "message_stop", "content_block_start",
    "content_block_delta", "content_block_stop", "text_delta", "input_json_delta", "thinking_delta",
    "signature_delta", "tool_use", "text", "thinking", "message", "function_call", "reasoning",
    "output_text", "refusal", "summary_text", "reasoning_text", "chat.completion.chunk", "",
    *sorted(dialects.RESPONSE_LIFECYCLE | dialects._RESPONSE_OUTPUT),
    "response.output_item.added", "response.output_item.done", "response.content_part.added",
    "response.content_part.done", "response.output_text.done", "response.refusal.done",
    "response.function_call_arguments.done", "response.reasoning_summary_part.added",
    "response.reasoning_summary_part.done", "response.reasoning_summary_text.delta",
    "response.reasoning_summary_text.done", "response.reasoning_text.delta", "response.reasoning_text.done",
]

scalars = (
    st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats()
    | st.text(max_size=8) | st.sampled_from(KEYS + TYPES)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=6),
    max_leaves=25,
)
typed_objects = st.builds(
    lambda t, rest: {**rest, "type": t},
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
)

REAL_EVENTS = {
    d: [e for name in ALL_STREAMS if name.startswith(d + "/") for e in events_of(name)]
    for d in WHERE
} if STREAMS.is_dir() else {}


def value_paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from value_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from value_paths(v, (*prefix, i))


@st.composite
def mutated(draw, events: list[Event]):
    """A real event with one value somewhere replaced by garbage, or one key/item removed."""
    event = draw(st.sampled_from(events))
    try:
        obj = json.loads(event.data)
    except ValueError:
        return event
    path = draw(st.sampled_from(list(value_paths(obj))))
    if not path:
        obj = draw(json_values)
    else:
        target = obj
        for key in path[:-1]:
            target = target[key]
        if draw(st.booleans()):
            target[path[-1]] = draw(json_values)
        else:
            del target[path[-1]]
    return Event(event=event.event, data=json.dumps(obj))


datas = st.one_of(
    st.text(max_size=30),
    json_values.map(json.dumps),
    typed_objects.map(json.dumps),
    st.sampled_from(["[DONE]", "[DONE]  ", "{", "null", "[]", '"x"', "1e999", "-Infinity", "NaN", "[" * 3000, "{}"]),
)
names = st.sampled_from(["message", "error", "ping", *TYPES]) | st.text(max_size=10)
garbage_events = st.builds(lambda n, d: Event(event=n, data=d), names, datas)


@st.composite
def streams(draw):
    """(provider, path, events): mostly mutated events of that dialect's examples, some garbage."""
    directory = draw(st.sampled_from(sorted(WHERE)))
    own = REAL_EVENTS[directory]
    anyone = [e for events in REAL_EVENTS.values() for e in events]
    event = st.one_of(
        mutated(own), mutated(own), st.sampled_from(own), mutated(anyone), garbage_events,
    )
    return (*WHERE[directory], draw(st.lists(event, max_size=30)))


def check_summary_types(s: StreamSummary, n: int) -> None:
    assert s.events == n
    assert isinstance(s.complete, bool)
    assert s.error is None or isinstance(s.error, str)
    assert s.model is None or isinstance(s.model, str)
    assert s.finish_reason is None or isinstance(s.finish_reason, str)
    assert s.usage is None or isinstance(s.usage, dict)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_garbage_never_raises(stream):
    provider, path, events = stream
    # public API
    s = stream_summary(provider, path)
    for ev in events:
        assert s.add(ev) in (True, False)
    check_summary_types(s, len(events))
    # and without the safety net: the parsing itself must not raise
    strict = dialects._SUMMARIES[dialect_for(provider, path)]()
    for ev in events:
        strict.events += 1
        assert strict._add(ev) in (True, False)
    check_summary_types(strict, len(events))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), json_values.map(json.dumps), typed_objects.map(json.dumps)), st.sampled_from(sorted(WHERE.values())))
def test_body_summary_garbage_never_raises(body, where_):
    out = body_summary(*where_, body)
    assert set(out) == {"model", "finish_reason", "usage", "error"}
    assert out["model"] is None or isinstance(out["model"], str)
    assert out["finish_reason"] is None or isinstance(out["finish_reason"], str)
    assert out["usage"] is None or isinstance(out["usage"], dict)
    assert out["error"] is None or isinstance(out["error"], str)
