"""providers.py: host rules, per-dialect stream semantics, body summaries and stream assembly.

Expectations for the example streams (tests/data/streams) were read off the files by hand, not taken
from this code's output. The chat/Azure and Responses oracles are the openai SDK's own
accumulators (facts §6).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4u_mitm import providers as P
from r4u_mitm.providers import (
    DEFAULT_HOSTS,
    StreamSummary,
    assemble,
    body_summary,
    dialect_for,
    parse_host_rules,
    stream_summary,
)
from r4u_mitm.sse import Event, SSEDecoder
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
# Host rules


def test_default_hosts():
    rules = parse_host_rules(DEFAULT_HOSTS)
    assert rules.match("api.openai.com", 443) == "openai"
    assert rules.match("myres.openai.azure.com", 443) == "azure_openai"
    assert rules.match("eastus.myres.openai.azure.com") == "azure_openai"
    assert rules.match("openai.azure.com", 443) is None
    assert rules.match("api.anthropic.com", 443) is None
    assert rules.match("example.com", 443) is None


@pytest.mark.parametrize(
    "entry, provider",
    [
        ("api.openai.com", "openai"),
        ("API.OpenAI.com", "openai"),
        ("*.openai.azure.com", "azure_openai"),
        ("myres.openai.azure.com", "azure_openai"),
        ("api.anthropic.com", "anthropic"),
        ("localhost:8000", "openai_compatible"),
        ("api.groq.com", "openai_compatible"),
        ("*.example.com", "openai_compatible"),
        ("openai.azure.com", "openai_compatible"),  # not an Azure resource host
        ("api.openai.com.evil.com", "openai_compatible"),
    ],
)
def test_provider_inferred_from_host(entry, provider):
    (rule,) = parse_host_rules([entry]).rules
    assert rule.provider == provider


def test_explicit_provider_wins_over_inference_and_is_case_insensitive():
    rules = parse_host_rules(["api.openai.com=openai_compatible", "llm.corp=Anthropic"])
    assert rules.match("api.openai.com") == "openai_compatible"
    assert rules.match("llm.corp") == "anthropic"


def test_match_is_case_insensitive_and_ignores_trailing_dot():
    rules = parse_host_rules(["Api.OpenAI.com", "*.Example.COM"])
    assert rules.match("API.OPENAI.COM", 443) == "openai"
    assert rules.match("api.openai.com.", 443) == "openai"
    assert rules.match("A.B.example.com") == "openai_compatible"


def test_wildcards():
    rules = parse_host_rules(["*.x.com=anthropic"])
    assert rules.match("a.x.com") == "anthropic"
    assert rules.match("a.b.x.com") == "anthropic"
    assert rules.match("x.com") is None
    assert rules.match("ax.com") is None
    assert rules.match("a.x.com.org") is None


def test_ports():
    rules = parse_host_rules(["localhost:8000=openai_compatible", "api.openai.com"])
    assert rules.match("localhost", 8000) == "openai_compatible"
    assert rules.match("localhost", 8001) is None
    assert rules.match("localhost") is None  # a port rule needs that port
    assert rules.match("api.openai.com", 443) == "openai"  # no port: any port
    assert rules.match("api.openai.com", 8443) == "openai"
    assert rules.match("api.openai.com") == "openai"


def test_wildcard_with_port():
    rules = parse_host_rules(["*.corp:8443=openai_compatible"])
    assert rules.match("llm.corp", 8443) == "openai_compatible"
    assert rules.match("llm.corp", 443) is None


def test_ip_addresses():
    rules = parse_host_rules(["127.0.0.1:8080", "[::1]:9000=anthropic", "[2001:db8::1]"])
    assert rules.match("127.0.0.1", 8080) == "openai_compatible"
    assert rules.match("127.0.0.1", 80) is None
    assert rules.match("::1", 9000) == "anthropic"
    assert rules.match("[::1]", 9000) == "anthropic"
    assert rules.match("0:0:0:0:0:0:0:1", 9000) == "anthropic"
    assert rules.match("2001:db8:0::1", 443) == "openai_compatible"


def test_internationalized_names():
    rules = parse_host_rules(["llm.bücher.example=anthropic"])
    assert rules.rules[0].host == "llm.xn--bcher-kva.example"
    assert rules.match("llm.xn--bcher-kva.example") == "anthropic"
    assert rules.match("LLM.Bücher.example") == "anthropic"


def test_precedence_exact_beats_wildcard_longer_wildcard_beats_shorter_port_beats_none():
    rules = parse_host_rules(
        [
            "*.openai.azure.com",
            "special.openai.azure.com=openai_compatible",
            "*.eu.openai.azure.com=anthropic",
            "special.openai.azure.com:8443=openai",
        ]
    )
    assert rules.match("a.openai.azure.com") == "azure_openai"
    assert rules.match("special.openai.azure.com", 443) == "openai_compatible"
    assert rules.match("special.openai.azure.com", 8443) == "openai"
    assert rules.match("res.eu.openai.azure.com") == "anthropic"


def test_duplicates_are_fine_conflicts_are_not():
    assert len(parse_host_rules(["api.openai.com", "API.openai.com=openai"])) == 1
    with pytest.raises(ValueError, match="conflicts"):
        parse_host_rules(["api.openai.com", "api.openai.com=anthropic"])


def test_a_lone_string_is_one_entry():
    assert parse_host_rules("api.openai.com").match("api.openai.com") == "openai"


@pytest.mark.parametrize(
    "entry, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("api.openai.com=", "missing provider"),
        ("api.openai.com=gemini", "unknown provider 'gemini'"),
        ("*", "api"),  # any message is fine, as long as it names the entry (checked below)
        ("*.", "not a host"),
        ("a.*.com", "wildcard"),
        ("*x.com", "wildcard"),
        ("**.x.com", "wildcard"),
        ("x.*", "wildcard"),
        ("api.openai.com:0", "port"),
        ("api.openai.com:65536", "port"),
        ("api.openai.com:http", "port"),
        ("api.openai.com:", "port"),
        ("https://api.openai.com", "port"),
        ("api..openai.com", "not a host"),
        ("api openai.com", "not a host"),
        ("[::1", "IPv6"),
        ("[::1]x", "after"),
    ],
)
def test_invalid_entries(entry, words):
    with pytest.raises(ValueError) as info:
        parse_host_rules(["api.openai.com", entry])
    message = str(info.value)
    assert repr(entry) in message or "empty" in message
    if words != "api":
        assert words in message


def test_invalid_entry_that_is_not_a_string():
    with pytest.raises(ValueError):
        parse_host_rules([None])  # type: ignore[list-item]


def test_match_garbage_hosts():
    rules = parse_host_rules(DEFAULT_HOSTS)
    for host in ("", ".", "[", "]", ":::", "[zz::1]", "*.openai.azure.com"):
        assert rules.match(host, 443) in (None, "azure_openai")


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
CHAT_STREAMS = [n for n in ALL_STREAMS if n.split("/")[0] in ("openai_chat", "azure_chat")]


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


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_example_stream_assembly_carries_the_summary(name):
    n, complete, error, model, finish_reason, usage, _ = EXPECTED[name]
    result = assemble(*where(name), events_of(name))
    assert (result["events"], result["complete"], result["error"]) == (n, complete, error)
    assert (result["model"], result["finish_reason"], result["usage"]) == (model, finish_reason, usage)
    json.dumps(result)  # plain data, ready for a content view or a record


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
        result = assemble(provider, path, events[:k])
        assert result["complete"] is False
        json.dumps(result)


@pytest.mark.parametrize("name", ALL_STREAMS)
def test_cut_inside_the_bytes_is_incomplete(name):
    provider, path = where(name)
    raw = raw_of(name)
    body = raw.rstrip(b"\n")
    done_at = len(body) + 2  # the terminal event is dispatched by the blank line after it
    last_start = body.rfind(b"\n\n") + 2
    offsets = set(range(0, done_at, 53)) | set(range(last_start - 2, done_at))
    for off in sorted(offsets):
        s, _ = summarize(provider, path, decode(raw[:off]))
        assert s.complete is False, off
        assemble(provider, path, decode(raw[:off]))
    s, _ = summarize(provider, path, decode(raw[:done_at]))
    assert s.complete is True


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


def test_azure_frames_are_ignored_whatever_they_hold():
    frame = {
        "object": "", "id": "", "model": "", "created": 0,
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "content_filter",
                     "content_filter_results": {}}],
        "usage": {"total_tokens": 1},
    }
    events = [Event(data=json.dumps(frame)), chunk([{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}])]
    s, first = summarize("azure_openai", AZURE_PATH, events)
    assert (first, s.finish_reason, s.usage, s.model) == (1, None, None, "m")
    result = assemble("azure_openai", AZURE_PATH, events)
    assert [(c["content"], c["finish_reason"]) for c in result["choices"]] == [("ok", None)]


def test_chat_finish_without_a_delta():
    events = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]),
        chunk([{"index": 0, "finish_reason": "stop"}]),
    ]
    result = assemble("openai_compatible", CHAT_PATH, events)
    assert result["finish_reason"] == "stop"
    assert [(c["content"], c["finish_reason"]) for c in result["choices"]] == [("hi", "stop")]


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
    *sorted(P._RESPONSE_LIFECYCLE | P._RESPONSE_OUTPUT),
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


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw, events: list[Event]):
    """A real event with one value somewhere replaced by garbage, or one key/item removed."""
    event = draw(st.sampled_from(events))
    try:
        obj = json.loads(event.data)
    except ValueError:
        return event
    path = draw(st.sampled_from(list(_paths(obj))))
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
    dialect = dialect_for(provider, path)
    # public API
    s = stream_summary(provider, path)
    for ev in events:
        assert s.add(ev) in (True, False)
    check_summary_types(s, len(events))
    json.dumps(assemble(provider, path, events))
    # and without the safety net: the parsing itself must not raise
    strict = P._SUMMARIES[dialect]()
    acc = P._ASSEMBLIES[dialect]()
    for ev in events:
        strict.events += 1
        out = strict._add(ev)
        assert out is acc._add(ev)
        assert out in (True, False)
    check_summary_types(strict, len(events))
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
        for where_ in _paths(original):
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
                acc = P._ASSEMBLIES[dialect]()
                for ev in events[:i]:
                    acc._add(ev)
                acc._add(Event(event=event.event, data=json.dumps(obj)))
                json.dumps(acc.result())  # the stream cut right after the bad event
                for ev in events[i + 1 :]:
                    acc._add(ev)
                json.dumps(acc.result())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), json_values.map(json.dumps), typed_objects.map(json.dumps)), st.sampled_from(sorted(WHERE.values())))
def test_body_summary_garbage_never_raises(body, where_):
    out = body_summary(*where_, body)
    assert set(out) == {"model", "finish_reason", "usage", "error"}
    assert out["model"] is None or isinstance(out["model"], str)
    assert out["finish_reason"] is None or isinstance(out["finish_reason"], str)
    assert out["usage"] is None or isinstance(out["usage"], dict)
    assert out["error"] is None or isinstance(out["error"], str)
