import gzip
import json
from datetime import datetime
from unittest import mock

from r4u_mitm.pure import recordjson
from r4u_mitm.pure.record import REDACTED, Exchange, build_record, redact_headers, redact_url, who_ended
from r4u_mitm.pure.recordjson import encode_record
from tests.harness import STREAMS

SECRET = "sk-record-SECRET-123456"
BASIC = (STREAMS / "openai_chat" / "basic.sse").read_bytes()


def exchange(**kw) -> Exchange:
    base = dict(
        trace_id="t-1", provider="openai", url="https://api.openai.com/v1/chat/completions", method="POST",
        path="/v1/chat/completions",
        request_headers=[("Authorization", f"Bearer {SECRET}"), ("content-type", "application/json")],
        request_body=b'{"model":"gpt-4o","stream":true}', started_wall=1_700_000_000.0, started=100.0,
        ended=102.5, status_code=200, headers_at=100.2,
        response_headers=[("content-type", "text/event-stream; charset=utf-8"), ("x-request-id", "req_1"),
                          ("set-cookie", f"__cf_bm={SECRET}"), ("x-ratelimit-remaining-tokens", "999")],
    )
    base.update(kw)
    return Exchange(**base)


def streamed(raw: bytes, cut: int | None = None, **kw) -> Exchange:
    """A stream teed in 7-byte pieces, one every 10 ms from t=100.3."""
    raw = raw if cut is None else raw[:cut]
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]
    return exchange(stream=True, pieces=pieces, piece_times=[100.3 + i * 0.01 for i in range(len(pieces))],
                    wire_bytes=len(raw), **kw)


def test_complete_stream_record_follows_the_contract():
    record = build_record(streamed(BASIC), max_body_bytes=1 << 20)
    assert record["response"] == BASIC.decode()
    assert record["error"] is None and record["status_code"] == 200
    assert record["request"] == '{"model":"gpt-4o","stream":true}'
    assert record["request_method"] == "POST" and record["request_path"] == "/v1/chat/completions"
    started, completed = (datetime.fromisoformat(record[k]) for k in ("started_at", "completed_at"))
    assert started.utcoffset().total_seconds() == 0
    assert (completed - started).total_seconds() == 2.5
    meta = record["metadata"]
    assert meta["trace_id"] == "t-1" and meta["stream"] is True and meta["stream_complete"] is True
    assert meta["events"] == BASIC.count(b"\n\n")
    assert meta["ttfb_ms"] == 200.0 and meta["duration_ms"] == 2500.0
    # The first content delta is the second event: ttft is the arrival of the piece completing it.
    second_event_end = BASIC.index(b"\n\n", BASIC.index(b"\n\n") + 2) + 2
    assert meta["ttft_ms"] == round((0.3 + ((second_event_end - 1) // 7) * 0.01) * 1000, 3)
    assert meta["model"] == "gpt-4.1-nano-2025-04-14" and meta["finish_reason"] == "stop"
    assert meta["upstream_request_id"] == "req_1" and meta["response_bytes"] == len(BASIC)
    assert SECRET not in json.dumps(record)
    assert record["response_headers"]["x-ratelimit-remaining-tokens"] == "999"


def test_transport_error_after_the_terminal_event_is_no_error():
    record = build_record(streamed(BASIC, transport_error="Client disconnected."), max_body_bytes=1 << 20)
    assert record["error"] is None and record["metadata"]["stream_complete"] is True


def test_stream_cut_before_its_end_keeps_the_partial_text_and_says_who():
    cut = BASIC.index(b"\n\n", 600) + 2
    record = build_record(streamed(BASIC, cut=cut, transport_error="Client disconnected."), max_body_bytes=1 << 20)
    assert record["response"] == BASIC[:cut].decode()
    assert record["metadata"]["stream_complete"] is False
    assert record["error"].startswith("client aborted after ")
    upstream = build_record(streamed(BASIC, cut=cut), max_body_bytes=1 << 20)
    assert upstream["error"].startswith("stream ended by the upstream before its terminal event")


def test_provider_error_in_stream_is_the_error():
    raw = (STREAMS / "openai_chat" / "error_midstream.sse").read_bytes()
    record = build_record(streamed(raw), max_body_bytes=1 << 20)
    assert "The server had an error" in record["error"]


def test_non_stream_error_answer():
    body = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}'
    ex = exchange(status_code=429, response_headers=[("content-type", "application/json")], pieces=[body])
    record = build_record(ex, max_body_bytes=1 << 20)
    assert record["error"].startswith("HTTP 429: ") and "Rate limit reached" in record["error"]
    assert record["metadata"]["stream_complete"] is None
    plain = build_record(exchange(status_code=503, response_headers=[("content-type", "text/plain")],
                                  pieces=[b"upstream unavailable"]), max_body_bytes=1 << 20)
    assert plain["error"] == "HTTP 503" and plain["response"] == "upstream unavailable"


def test_no_response_at_all():
    record = build_record(exchange(status_code=0, response_headers=[], transport_error="connection refused"),
                          max_body_bytes=1 << 20)
    assert record["status_code"] == 0 and record["response"] == "" and record["response_headers"] == {}
    assert record["error"] == "upstream failed: connection refused"


def test_bodies_are_decoded_from_their_content_encoding():
    body = json.dumps({"id": "chatcmpl-1", "model": "gpt-4o", "choices": []}).encode()
    ex = exchange(request_headers=[("content-encoding", "gzip"), ("content-type", "application/json")],
                  request_body=gzip.compress(b'{"a":1}'),
                  response_headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
                  pieces=[gzip.compress(body)])
    record = build_record(ex, max_body_bytes=1 << 20)
    assert record["request"] == '{"a":1}' and record["response"] == body.decode()
    assert record["metadata"]["model"] == "gpt-4o"


def test_binary_bodies_become_a_placeholder():
    ex = exchange(request_headers=[("content-type", "multipart/form-data; boundary=x")], request_body=b"\xff" * 1000,
                  response_headers=[("content-type", "audio/mpeg")], pieces=[b"ID3" + bytes(range(256))])
    record = build_record(ex, max_body_bytes=1 << 20)
    assert record["request"] == "[binary 1000 bytes, multipart/form-data]"
    assert record["response"] == "[binary 259 bytes, audio/mpeg]"
    unknown = build_record(exchange(request_headers=[], request_body=b"\x00\xff\xfe"), max_body_bytes=100)
    assert unknown["request"] == "[binary 3 bytes, unknown type]"


def test_truncated_stream_says_so_and_leaves_completeness_unknown():
    record = build_record(streamed(BASIC, truncated=True, cut=500), max_body_bytes=1 << 20)
    assert record["metadata"]["truncated"] is True
    assert record["metadata"]["stream_complete"] is None and record["error"] is None
    capped = build_record(streamed(BASIC), max_body_bytes=300)
    assert len(capped["response"].encode()) == 300 and capped["metadata"]["truncated"] is True


def test_properties_land_in_metadata():
    record = build_record(exchange(properties={"session": "s1"}, pieces=[b"{}"],
                                   response_headers=[("content-type", "application/json")]), max_body_bytes=100)
    assert record["metadata"]["properties"] == {"session": "s1"}


def test_header_redaction_takes_secrets_not_lookalikes():
    pairs = [("Authorization", "Bearer x"), ("api-key", "x"), ("X-Api-Key", "x"), ("Cookie", "a=b"),
             ("x-goog-api-key", "x"), ("X-Auth-Token", "x"), ("anthropic-api-key", "x"), ("x-custom-secret", "x"),
             ("x-ratelimit-remaining-tokens", "10"), ("x-ratelimit-limit-tokens", "20"),
             ("openai-processing-ms", "5"), ("x-request-id", "req"), ("set-cookie", "a"), ("set-cookie", "b"),
             ("X-Mine", "m")]
    out = redact_headers(pairs, frozenset({"x-mine"}))
    secret = {"authorization", "api-key", "x-api-key", "cookie", "x-goog-api-key", "x-auth-token",
              "anthropic-api-key", "x-custom-secret", "set-cookie", "x-mine"}
    assert {k for k, v in out.items() if v == REDACTED} == secret
    assert out["x-ratelimit-remaining-tokens"] == "10" and out["openai-processing-ms"] == "5"


def test_url_query_secrets_are_redacted():
    url = "https://x.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21&api-key=SEKRIT"
    assert redact_url(url) == url.replace("SEKRIT", REDACTED)
    assert "AIza" not in redact_url("https://generativelanguage.googleapis.com/v1/models?key=AIzaXYZ")
    assert redact_url("https://api.openai.com/v1/models") == "https://api.openai.com/v1/models"


def test_who_ended():
    assert who_ended("Client disconnected.") == "client aborted"
    assert who_ended("stream reset by client (CANCEL)") == "client aborted"
    assert who_ended("peer closed connection") == "upstream failed"
    assert who_ended("HTTP/1 protocol error: incomplete chunked read") == "upstream failed"
    assert who_ended("Connection timed out") == "timeout"


def test_secret_body_members_are_redacted_in_the_request_and_the_stream():
    """build_record applies redact.py to both bodies (the rules are tested in test_redact.py),
    with `redact_body_keys` as extra names; the summary is read before, from the real stream."""
    usage = (STREAMS / "openai_chat" / "include_usage.sse").read_bytes()
    secret = SECRET.encode()
    request = (b'{"model":"gpt-4o","stream":true,"data_sources":[{"type":"azure_search","parameters":'
               b'{"authentication":{"type":"api_key","key":"%s"}}}],"ticket":"%s"}' % (secret, secret))
    answer = usage.replace(b'"choices":[]',
                           b'"choices":[],"client_secret":{"value":"%s"},"Ticket":"%s"' % (secret, secret))
    record = build_record(streamed(answer, request_body=request), max_body_bytes=1 << 20, redact_body_keys=["ticket"])
    assert SECRET not in json.dumps(record)
    secret_json = f'"{SECRET}"'
    assert record["request"] == request.decode().replace(secret_json, f'"{REDACTED}"')
    assert record["response"] == answer.decode().replace(f'{{"value":{secret_json}}}', f'"{REDACTED}"').replace(
        secret_json, f'"{REDACTED}"')
    unredacted = build_record(streamed(usage), max_body_bytes=1 << 20)["metadata"]
    assert record["metadata"]["usage"] == unredacted["usage"] and unredacted["usage"]["total_tokens"] > 0
    assert record["metadata"]["stream_complete"] is True
    plain = build_record(exchange(request_body=request, pieces=[request], response_headers=[
        ("content-type", "application/json")]), max_body_bytes=1 << 20)
    assert '"ticket":"%s"' % SECRET in plain["response"]  # not a default name: only as an extra one
    assert '"key":"[REDACTED]"' in plain["response"]


def test_secret_body_members_are_redacted_whatever_the_charset():
    """The redaction's pre-check reads a body's bytes rather than its text only when they are
    the text's UTF-8: in UTF-16, or in Latin-1 with a name beyond ASCII, the bytes do not spell
    the key; bytes that are not UTF-8 in a UTF-8 body become U+FFFD in the text."""
    doc = '{"model":"gpt-4o","clé":"%s","n":1}' % SECRET
    for charset, encode in [("utf-16", lambda s: s.encode("utf-16")), ("latin-1", lambda s: s.encode("latin-1")),
                            ("utf-8", lambda s: s.encode().replace(b"gpt-4o", b"gpt\xff-4o"))]:
        body, stream = encode(doc), encode(f"data: {doc}\n\ndata: [DONE]\n\n")
        redacted = body.decode(charset, "replace").replace(SECRET, REDACTED)
        json_type = [("content-type", f"application/json; charset={charset}")]
        answer = exchange(request_headers=json_type, request_body=body, response_headers=json_type, pieces=[body])
        streamed_answer = streamed(stream, request_headers=json_type, request_body=body,
                                   response_headers=[("content-type", f"text/event-stream; charset={charset}")])
        for ex in (answer, streamed_answer):
            record = build_record(ex, max_body_bytes=1 << 20, redact_body_keys=["clé"])
            assert record["request"] == redacted, charset
            assert redacted in record["response"] and SECRET not in record["response"], charset


def test_azure_and_compatible_hosts_go_as_openai_urls_with_the_truth_beside():
    azure = ("https://contoso.openai.azure.com/openai/deployments/gpt-4o/chat/completions"
             "?api-version=2024-10-21&api-key=SEKRIT")
    ex = streamed(BASIC, provider="azure_openai", url=azure, path="/openai/deployments/gpt-4o/chat/completions")
    meta = build_record(ex, max_body_bytes=1 << 20)["metadata"]
    assert meta["url"] == "https://api.openai.com/v1/chat/completions"
    assert meta["upstream_url"] == azure.replace("SEKRIT", REDACTED)
    assert meta["azure_deployment"] == "gpt-4o" and meta["api_version"] == "2024-10-21"
    assert meta["provider"] == "azure_openai" and meta["model"] == "gpt-4.1-nano-2025-04-14"
    local = "http://localhost:11434/v1/embeddings"
    meta = build_record(exchange(provider="openai_compatible", url=local, path="/v1/embeddings"),
                        max_body_bytes=100)["metadata"]
    assert meta["url"] == "https://api.openai.com/v1/embeddings" and meta["upstream_url"] == local
    assert "azure_deployment" not in meta and "api_version" not in meta


def test_openai_url_alias_off_or_no_known_operation_keeps_the_real_url_alone():
    azure = "https://contoso.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    off = build_record(exchange(provider="azure_openai", url=azure), max_body_bytes=100, openai_url_alias=False)
    native = build_record(exchange(provider="openai_compatible", url="http://localhost:11434/api/chat",
                                   path="/api/chat"), max_body_bytes=100)
    openai = build_record(exchange(), max_body_bytes=100)
    for record, url in ((off, azure), (native, "http://localhost:11434/api/chat"),
                        (openai, "https://api.openai.com/v1/chat/completions")):
        assert record["metadata"]["url"] == url
        assert not {"upstream_url", "azure_deployment", "api_version"} & record["metadata"].keys()


def test_upstream_request_id_is_the_providers_own_header():
    def request_id(provider, *headers):
        return build_record(exchange(provider=provider, response_headers=list(headers)),
                            max_body_bytes=100)["metadata"]["upstream_request_id"]

    assert request_id("openai", ("X-Request-Id", "req_o"), ("request-id", "other")) == "req_o"
    assert request_id("openai_compatible", ("x-request-id", "req_c")) == "req_c"
    assert request_id("anthropic", ("request-id", "req_011C"), ("x-request-id", "envoy")) == "req_011C"
    assert request_id("anthropic", ("x-request-id", "envoy")) is None
    assert request_id("azure_openai", ("apim-request-id", "apim-1"), ("x-request-id", "req_a")) == "req_a"
    assert request_id("azure_openai", ("apim-request-id", "apim-1")) == "apim-1"
    assert request_id("azure_openai", ("x-request-id", ""), ("apim-request-id", "apim-1")) == "apim-1"
    assert request_id("openai", ("apim-request-id", "apim-1")) is None


# A body bigger than recordjson.SLICE bytes is kept as bytes --------------------------------------

DIALECT_PATHS = {"openai_chat": ("openai", "/v1/chat/completions"), "framing": ("openai", "/v1/chat/completions"),
                 "azure_chat": ("azure_openai", "/openai/deployments/d/chat/completions"),
                 "openai_completions": ("openai", "/v1/completions"), "openai_responses": ("openai", "/v1/responses"),
                 "anthropic": ("anthropic", "/v1/messages")}


def body_cases():
    """Exchanges whose bodies take each way to the record's text: every example stream (the
    chat fast path, the full reading), compressed, cut by the limit; answers in JSON, plain text,
    without a type (valid UTF-8 or not), in Latin-1, binary; bodies with secrets."""
    json_type, no_type = [("content-type", "application/json")], [("content-type", "")]
    for path in sorted(STREAMS.rglob("*.sse")):
        provider, api = DIALECT_PATHS[path.parent.name]
        raw = path.read_bytes() * 3
        yield path.name, streamed(raw, provider=provider, path=api), 1 << 20
        yield f"{path.name} cut", streamed(raw, provider=provider, path=api), len(raw) // 2
        gz = exchange(stream=True, pieces=[gzip.compress(raw)], piece_times=[100.5], provider=provider, path=api,
                      response_headers=[("content-type", "text/event-stream"), ("content-encoding", "gzip")])
        yield f"{path.name} gzip", gz, 1 << 20
    answer = json.dumps({"model": "m", "choices": [{"message": {"content": "é😀\"\\\n" * 40}}]}).encode()
    yield "json", exchange(pieces=[answer], response_headers=json_type), 1 << 20
    yield "json gzip", exchange(pieces=[gzip.compress(answer)], response_headers=[
        *json_type, ("content-encoding", "gzip")]), 1 << 20
    yield "text", exchange(pieces=[answer], response_headers=[("content-type", "text/plain")]), 1 << 20
    yield "no type", exchange(pieces=[answer], response_headers=no_type), 1 << 20
    yield "no type, not UTF-8", exchange(pieces=[answer + b"\xff"], response_headers=no_type), 1 << 20
    yield "latin-1", exchange(pieces=["é".encode("latin-1") * 100], response_headers=[
        ("content-type", "text/plain; charset=latin-1")]), 1 << 20
    yield "binary", exchange(pieces=[bytes(range(256))], response_headers=[("content-type", "image/png")]), 1 << 20
    secret = json.dumps({"api_key": SECRET, "messages": [{"content": "é😀" * 40}]}).encode()
    yield "secrets", streamed(BASIC.replace(b'"model"', b'"api_key":"%s","model"' % SECRET.encode()),
                              request_body=secret), 1 << 20


def test_a_big_body_is_kept_as_bytes_and_gives_the_same_record():
    """With recordjson.SLICE at 64 bytes, the bodies above take the bytes way (`Utf8Text`,
    encoded from its bytes) where they are UTF-8 text: the record's bytes are those of its
    text (every test body here is under the real SLICE: a str)."""
    kinds = set()
    for name, ex, limit in body_cases():
        as_text = encode_record(build_record(ex, max_body_bytes=limit))
        with mock.patch.object(recordjson, "SLICE", 64):
            record = build_record(ex, max_body_bytes=limit)
            assert encode_record(record) == as_text, name
        kinds.add((name, type(record["response"]).__name__))
    assert ("basic.sse", "Utf8Text") in kinds and ("text.sse gzip", "Utf8Text") in kinds  # fast and full reading
    assert {("no type", "Utf8Text"), ("no type, not UTF-8", "str"), ("latin-1", "str"), ("binary", "str"),
            ("secrets", "str")} <= kinds  # a big body with a secret-looking key is read as text
