"""assembly.py: a stream's result put back together for people to read, per dialect.

The chat/Azure and Responses oracles are the openai SDK's own accumulators (facts §6); the other
expectations were read off the example streams (tests/data/streams) by hand.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from r4u_mitm.pure import assembly, dialects
from r4u_mitm.pure.assembly import assemble
from r4u_mitm.pure.dialects import dialect_for
from r4u_mitm.pure.sse import Event
from tests.test_dialects import (
    ALL_STREAMS,
    AZURE_PATH,
    CHAT_PATH,
    COMPLETIONS_PATH,
    EXPECTED,
    MESSAGES_PATH,
    RESPONSES_PATH,
    azure_frame_then_output,
    chunk,
    cuts,
    decode,
    events_of,
    raw_of,
    streams,
    value_paths,
    where,
)

CHAT_STREAMS = [n for n in ALL_STREAMS if n.split("/")[0] in ("openai_chat", "azure_chat")]


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_example_stream_assembly_carries_the_summary(name):
    n, complete, error, model, finish_reason, usage, _ = EXPECTED[name]
    result = assemble(*where(name), events_of(name))
    assert (result["events"], result["complete"], result["error"]) == (n, complete, error)
    assert (result["model"], result["finish_reason"], result["usage"]) == (model, finish_reason, usage)
    json.dumps(result)  # plain data, ready for a content view or a record


# ---------------------------------------------------------------------------------------------
# Truncated streams


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_cut_at_every_event_boundary_is_incomplete(name):
    provider, path = where(name)
    events = events_of(name)
    for k in range(len(events)):  # the last event is the terminal one in every example
        result = assemble(provider, path, events[:k])
        assert result["complete"] is False, k
        json.dumps(result)


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_cut_inside_the_bytes_is_incomplete(name):
    provider, path = where(name)
    raw = raw_of(name)
    offsets, _ = cuts(raw)
    for off in offsets:
        assert assemble(provider, path, decode(raw[:off]))["complete"] is False, off


# ---------------------------------------------------------------------------------------------
# Oracle: the SDK's ChatCompletionStreamState (facts §6)


def sdk_chat_snapshot(raw: bytes) -> dict:
    from openai._streaming import SSEDecoder as SDKDecoder
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    state = ChatCompletionStreamState()
    for sse in SDKDecoder().iter_bytes(iter([raw])):
        if sse.data.startswith("[DONE]"):
            break
        chunk = json.loads(sse.data)
        if chunk.get("object") != "chat.completion.chunk":  # Azure filter frames, {"error": ...}
            continue
        state.handle_chunk(ChatCompletionChunk.construct(**chunk))
    return state.current_completion_snapshot.to_dict()


@pytest.mark.parametrize("name", CHAT_STREAMS)
def test_chat_assembly_matches_the_sdk(name):
    raw = raw_of(name)
    snapshot = sdk_chat_snapshot(raw)
    mine = assemble(*where(name), decode(raw))
    assert mine["model"] == snapshot["model"]
    assert mine["id"] == snapshot["id"]
    assert mine["usage"] == snapshot.get("usage")
    theirs = sorted(snapshot["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in mine["choices"]] == [c["index"] for c in theirs]
    for ours, choice in zip(mine["choices"], theirs):
        message = choice["message"]
        assert ours["role"] == message.get("role")
        assert ours["content"] == message.get("content")
        assert ours["refusal"] == message.get("refusal")
        assert ours["finish_reason"] == choice.get("finish_reason")
        expected_calls = [
            {"id": tc["id"], "type": tc["type"], "name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
            for tc in message.get("tool_calls") or []
        ]
        got_calls = [{k: tc[k] for k in ("id", "type", "name", "arguments")} for tc in ours.get("tool_calls", [])]
        assert got_calls == expected_calls


def test_chat_assembly_content_by_hand():
    # guard against the oracle and the code agreeing on something wrong
    tools = assemble("openai", CHAT_PATH, events_of("openai_chat/tool_calls_parallel.sse"))["choices"][0]
    assert tools["content"] is None
    assert [(t["name"], t["parsed_arguments"]) for t in tools["tool_calls"]] == [
        ("get_forecast", {"city": "Porto", "days": 3}),
        ("get_local_time", {"city": "Porto"}),
    ]
    n2 = assemble("openai", CHAT_PATH, events_of("openai_chat/n2_interleaved.sse"))["choices"]
    assert [(c["content"], c["finish_reason"]) for c in n2] == [
        ("Owls can turn their heads about", "length"),
        ("Owls fly silently.", "stop"),
    ]
    blocked = assemble("azure_openai", AZURE_PATH, events_of("azure_chat/content_filter_blocked.sse"))
    assert blocked["choices"][0]["content"] == "Here's how"
    assert blocked["error"] is None
    basic = assemble("openai", CHAT_PATH, events_of("openai_chat/basic.sse"))
    assert basic["choices"][0]["content"] == "Salut ! Comment ça va ? 🥐"


# ---------------------------------------------------------------------------------------------
# Oracle: the SDK's Responses stream helper over a mock transport (facts §2, §6)


def sdk_responses(raw: bytes):
    import httpx2
    import openai

    transport = httpx2.MockTransport(
        lambda request: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    )
    client = openai.OpenAI(
        api_key="sk-test", base_url="http://mock.invalid/v1", max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )
    text_snapshots: dict[int, str] = {}
    argument_snapshots: dict[int, str] = {}
    with client.responses.stream(model="gpt-4.1", input="hi") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text_snapshots[event.output_index] = event.snapshot
            elif event.type == "response.function_call_arguments.delta":
                argument_snapshots[event.output_index] = event.snapshot
        final = stream.get_final_response()
    return text_snapshots, argument_snapshots, final


def compare_with_final(mine: dict, final) -> None:
    assert mine["output_text"] == final.output_text
    assert len(mine["output"]) == len(final.output)
    for ours, item in zip(mine["output"], final.output):
        assert ours["type"] == item.type
        assert ours["id"] == item.id
        if item.type == "message":
            assert ours["text"] == "".join(c.text for c in item.content if c.type == "output_text")
        elif item.type == "function_call":
            assert (ours["name"], ours["call_id"], ours["arguments"]) == (item.name, item.call_id, item.arguments)
            assert ours["parsed_arguments"] == json.loads(item.arguments)
        elif item.type == "reasoning":
            assert ours["summary"] == [s.text for s in item.summary]


RESPONSES_ORACLE = ["openai_responses/text.sse", "openai_responses/function_calls.sse", "openai_responses/reasoning_summary.sse"]


@pytest.mark.parametrize("name", RESPONSES_ORACLE)
def test_responses_assembly_matches_the_sdk(name):
    raw = raw_of(name)
    text_snapshots, argument_snapshots, final = sdk_responses(raw)
    events = decode(raw)
    mine = assemble("openai", RESPONSES_PATH, events)
    compare_with_final(mine, final)
    assert mine["status"] == final.status == "completed"
    assert mine["usage"] == final.usage.to_dict()

    # The deltas alone (no *.done, no response.completed) must give what the SDK accumulated.
    deltas_only = [e for e in events if not e.event.endswith(".done") and e.event != "response.completed"]
    partial = assemble("openai", RESPONSES_PATH, deltas_only)
    assert partial["complete"] is False
    for index, text in text_snapshots.items():
        assert partial["output"][index]["text"] == text
    for index, arguments in argument_snapshots.items():
        assert partial["output"][index]["arguments"] == arguments
    for ours, item in zip(partial["output"], final.output):
        if item.type == "reasoning":
            assert ours["summary"] == [s.text for s in item.summary]
    assert text_snapshots or argument_snapshots


def test_responses_assembly_by_hand():
    text = assemble("openai", RESPONSES_PATH, events_of("openai_responses/text.sse"))
    assert text["output_text"] == "Mount Fuji is 3,776 m — Japan's highest."
    calls = assemble("openai", RESPONSES_PATH, events_of("openai_responses/function_calls.sse"))["output"]
    assert [(c["name"], c["parsed_arguments"]) for c in calls] == [
        ("get_population", {"country": "Chile"}),
        ("get_population", {"country": "Peru"}),
    ]
    cut = assemble("openai", RESPONSES_PATH, events_of("openai_responses/incomplete.sse"))
    assert cut["status"] == "incomplete"
    assert cut["output"][0]["status"] == "incomplete"
    assert cut["output_text"] == "The Suez Canal opened in 1869, linking the Mediterranean"
    failed = assemble("openai", RESPONSES_PATH, events_of("openai_responses/failed.sse"))
    assert (failed["status"], failed["output_text"]) == ("failed", "Let me think")


# ---------------------------------------------------------------------------------------------
# Legacy completions and Anthropic assembly (read by hand)


def test_completions_assembly():
    basic = assemble("openai", COMPLETIONS_PATH, events_of("openai_completions/basic.sse"))
    assert basic["choices"] == [
        {"index": 0, "text": "\nOnce there was a lighthouse", "finish_reason": "length"}
    ]
    usage = assemble("openai", COMPLETIONS_PATH, events_of("openai_completions/logprobs_include_usage.sse"))
    assert usage["choices"] == [{"index": 0, "text": " True.", "finish_reason": "stop"}]


def test_anthropic_assembly():
    text = assemble("anthropic", MESSAGES_PATH, events_of("anthropic/text.sse"))
    assert text["content"] == [{"type": "text", "text": "Hi! The Nile is roughly 6,650 km long."}]
    assert (text["stop_reason"], text["role"], text["id"]) == ("end_turn", "assistant", "msg_01PbR2K6cH54L59dYcQXNZar")

    tool = assemble("anthropic", MESSAGES_PATH, events_of("anthropic/tool_use.sse"))
    assert tool["content"] == [
        {"type": "text", "text": "Let me look that up."},
        {
            "type": "tool_use",
            "id": "toolu_0137O7HG9B9otXVraDIQRy5A",
            "name": "search_library",
            "input": {"query": "bees", "limit": 3},
        },
    ]
    assert tool["stop_reason"] == "tool_use"

    thinking = assemble("anthropic", MESSAGES_PATH, events_of("anthropic/thinking.sse"))
    assert thinking["content"] == [
        {
            "type": "thinking",
            "thinking": "The user asks for half of 90. 90 ÷ 2 = 45.",
            "signature": "dysu/Fz+Q5N3qZzMMglBOQ9u+fHtaiNBfxTiYyxJ3LYZIs/AHYbspkLYVVcxOhAR5MJhizN/9Ar0GKXrGcmoVELm",
        },
        {"type": "text", "text": "Half of 90 is 45."},
    ]

    error = assemble("anthropic", MESSAGES_PATH, events_of("anthropic/error_overloaded.sse"))
    assert error["content"] == [{"type": "text", "text": "Certainly! Here"}]
    assert error["error"] == "overloaded_error: Overloaded"


def test_anthropic_tool_input_cut_short_is_shown_raw():
    events = events_of("anthropic/tool_use.sse")[:10]  # up to 'ees", "limit"'
    block = assemble("anthropic", MESSAGES_PATH, events)["content"][1]
    assert block["input"] is None
    assert block["input_json"] == '{"query": "bees", "limit"'


# ---------------------------------------------------------------------------------------------
# Rules not covered by the example files


def test_azure_frames_are_not_assembled():
    result = assemble("azure_openai", AZURE_PATH, azure_frame_then_output())
    assert [(c["content"], c["finish_reason"]) for c in result["choices"]] == [("ok", None)]


def test_chat_finish_without_a_delta():
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]),
        chunk([{"index": 0, "finish_reason": "stop"}]),
    ]
    result = assemble("openai_compatible", CHAT_PATH, events)
    assert result["finish_reason"] == "stop"
    assert [(c["content"], c["finish_reason"]) for c in result["choices"]] == [("hi", "stop")]


def test_tool_calls_from_other_servers():
    # interleaved, several indexes per chunk, split name, repeated id
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "a", "type": "function", "function": {"name": "get_", "arguments": ""}},
            {"index": 1, "id": "b", "type": "function", "function": {"name": "f", "arguments": "{"}},
        ]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "a", "function": {"name": "weather", "arguments": '{"x"'}},
            {"index": 1, "function": {"arguments": "}"}},
        ]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]),
    ]
    calls = assemble("openai_compatible", CHAT_PATH, events)["choices"][0]["tool_calls"]
    assert calls == [
        {"id": "a", "type": "function", "name": "get_weather", "arguments": '{"x": 1}', "parsed_arguments": {"x": 1}},
        {"id": "b", "type": "function", "name": "f", "arguments": "{}", "parsed_arguments": {}},
    ]


def test_tool_calls_without_index():
    events = [
        chunk([{"index": 0, "delta": {"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "[1"}}]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "]"}}]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": "x"}}]}}]),
    ]
    events.append(chunk([{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "y"}}]}}]))
    calls = assemble("openai_compatible", CHAT_PATH, events)["choices"][0]["tool_calls"]
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [("a", "f", "[1]"), ("b", "g", "xy")]
    assert calls[0]["parsed_arguments"] == [1]
    assert "parsed_arguments" not in calls[1]


# ---------------------------------------------------------------------------------------------
# Garbage never raises


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_garbage_never_raises(stream):
    provider, path, events = stream
    dialect = dialect_for(provider, path)
    json.dumps(assemble(provider, path, events))
    # without the safety net of add(): the parsing itself must not raise
    strict = dialects._SUMMARIES[dialect]()
    acc = assembly._ASSEMBLIES[dialect]()
    for ev in events:
        strict.events += 1
        out = strict._add(ev)
        assert out is acc._add(ev)
    result = acc.result()
    json.dumps(result)
    # the assembly sees the same stream as the summary
    assert (result["complete"], result["error"], result["model"], result["finish_reason"], result["usage"]) == (
        strict.complete, strict.error, strict.model, strict.finish_reason, strict.usage,
    )


NASTY = (None, 7, "s", [], {"k": [1]})
_DELETE = object()


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_every_value_of_every_example_replaced_or_removed(name):
    """Exhaustive: each value in each event, replaced by each of NASTY or deleted, one at a time.
    Runs the assembly (a summary underneath) without the safety net of add(), and reads its
    result both right after the bad event and at the end."""
    provider, path = where(name)
    dialect = dialect_for(provider, path)
    events = events_of(name)
    for i, event in enumerate(events):
        try:
            original = json.loads(event.data)
        except ValueError:
            continue
        for where_ in value_paths(original):
            for value in (*NASTY, _DELETE):
                if not where_ and value is _DELETE:
                    continue
                obj = json.loads(event.data)
                if not where_:
                    obj = value
                else:
                    target = obj
                    for key in where_[:-1]:
                        target = target[key]
                    if value is _DELETE:
                        del target[where_[-1]]
                    else:
                        target[where_[-1]] = json.loads(json.dumps(value))
                acc = assembly._ASSEMBLIES[dialect]()
                for ev in events[:i]:
                    acc._add(ev)
                acc._add(Event(event=event.event, data=json.dumps(obj)))
                json.dumps(acc.result())  # the stream cut right after the bad event
                for ev in events[i + 1 :]:
                    acc._add(ev)
                json.dumps(acc.result())


def test_responses_text_events_append_on_delta_and_replace_on_done():
    """Each kind of text (output, refusal, reasoning text, reasoning summary) at its own index."""
    def ev(kind: str, **data) -> Event:
        return Event(event=kind, data=json.dumps({"type": kind, "item_id": data.pop("item_id", "m"), **data}))

    events = [
        ev("response.output_item.added", item={"id": "m", "type": "message"}, output_index=0),
        ev("response.output_text.delta", delta="Hel", content_index=0),
        ev("response.output_text.delta", delta="lo", content_index=0),
        ev("response.refusal.delta", delta="can", content_index=1),
        ev("response.refusal.delta", delta="not", content_index=1),
        ev("response.refusal.done", refusal="cannot.", content_index=1),
        ev("response.output_item.added", item={"id": "r", "type": "reasoning"}, output_index=1),
        ev("response.reasoning_text.delta", item_id="r", delta="think", content_index=0),
        ev("response.reasoning_text.done", item_id="r", text="thought", content_index=0),
        ev("response.reasoning_summary_text.delta", item_id="r", delta="sum", summary_index=1),
        ev("response.reasoning_summary_text.delta", item_id="r", delta=7, summary_index=0),  # not text: ignored
        ev("response.reasoning_summary_part.done", item_id="r", part={"type": "summary_text", "text": "first"},
           summary_index=0),
    ]
    message, reasoning = assemble("openai", RESPONSES_PATH, events)["output"]
    assert (message["text"], message["refusal"]) == ("Hello", "cannot.")
    assert (reasoning["content"], reasoning["summary"]) == (["thought"], ["first", "sum"])
