"""Body redaction (r4u_mitm/pure/redact.py): the values of credential-carrying JSON members become
"[REDACTED]", every other byte stays; token counts, limits and non-JSON bodies are left alone."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4u_mitm.pure import redact
from r4u_mitm.pure.redact import REDACTED, SECRET_BODY_KEYS, body_redactor, is_secret_header

SECRET = "sk-body-SECRET-5e1d9c3b7a"
R = f'"{REDACTED}"'
DEFAULTS = body_redactor()


def hidden(text: str, *values: str) -> str:
    """`text` with each of these JSON values (as written in it) replaced by "[REDACTED]"."""
    for value in values:
        assert value in text
        text = text.replace(value, R)
    return text


def event_stream(*payloads: str) -> str:
    return "".join(f"data: {p}\n\n" for p in payloads) + "data: [DONE]\n\n"


CHUNK = ('{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,'
         '"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}')
USAGE = ('{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,'
         '"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0},'
         '"completion_tokens_details":{"reasoning_tokens":0}}}')
SPELLINGS = [*SECRET_BODY_KEYS, "apiKey", "API_KEY", "Api-Key", "apikey", "clientSecret", "Password",
             "accessToken", "AUTHORIZATION", "authorizationToken", "connectionString", "encodedApiKey"]


@pytest.mark.parametrize("name", SPELLINGS)
def test_each_default_name_never_survives_in_a_request_body(name):
    body = json.dumps({"model": "gpt-4o", name: SECRET, "max_tokens": 100, "messages": []}, indent=2)
    assert DEFAULTS.json(body) == hidden(body, f'"{SECRET}"')


@pytest.mark.parametrize("name", SPELLINGS)
def test_each_default_name_never_survives_in_a_stream_event(name):
    secret_chunk = CHUNK.replace('"usage":null', f'"usage":null,"{name}":"{SECRET}"')
    text = event_stream(CHUNK, secret_chunk, USAGE)
    assert DEFAULTS.event_stream(text) == hidden(text, f'"{SECRET}"')


def test_azure_on_your_data_authentication_never_survives():
    """Every `authentication` type of Azure "On Your Data", as the openai SDK sends it (extra_body)."""
    auths = [
        {"type": "api_key", "key": "S-key"},
        {"type": "connection_string", "connection_string": "S-conn"},
        {"type": "key_and_key_id", "key": "S-kk", "key_id": "S-kid"},
        {"type": "encoded_api_key", "encoded_api_key": "S-enc"},
        {"type": "access_token", "access_token": "S-at"},
        {"type": "username_and_password", "username": "ada", "password": "S-pw"},
        {"type": "system_assigned_managed_identity"},
        {"type": "user_assigned_managed_identity", "managed_identity_resource_id": "/subscriptions/x"},
    ]
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 800, "data_sources": [
        {"type": "azure_search", "parameters": {"endpoint": "https://s.search.windows.net", "index_name": "i",
                                                "authentication": auth, "top_n_documents": 5,
                                                "embedding_dependency": {"type": "endpoint", "endpoint": "https://e",
                                                                         "authentication": {"type": "api_key",
                                                                                            "key": "S-emb"}}}}
        for auth in auths]})
    out = DEFAULTS.json(body)
    secrets = ["S-key", "S-conn", "S-kk", "S-kid", "S-enc", "S-at", "S-pw", "S-emb"]
    assert out == hidden(body, *(f'"{s}"' for s in secrets))
    assert '"username": "ada"' in out and '"/subscriptions/x"' in out and '"top_n_documents": 5' in out


def test_realtime_client_secret_object_is_replaced_whole():
    answer = ('{\n  "id": "sess_1",\n  "object": "realtime.session",\n  "model": "gpt-4o-realtime-preview",\n'
              '  "max_response_output_tokens": "inf",\n  "client_secret": {\n    "value": "ek_abc123",\n'
              '    "expires_at": 1234567890\n  }\n}\n')
    obj = '{\n    "value": "ek_abc123",\n    "expires_at": 1234567890\n  }'
    assert DEFAULTS.json(answer) == hidden(answer, obj)


def test_realtime_client_secrets_endpoint_answer_is_redacted_by_its_path():
    """GA Realtime: `POST /v1/realtime/client_secrets` answers the key as the top-level `value`."""
    answer = '{"value":"ek_68af","expires_at":1756310470,"session":{"type":"realtime","model":"gpt-realtime"}}'
    assert body_redactor((), "/v1/realtime/client_secrets").json(answer) == hidden(answer, '"ek_68af"')
    assert body_redactor((), "/v1/chat/completions").json(answer) == answer  # elsewhere `value` is data


def test_anthropic_mcp_authorization_token_and_mcp_tool_headers():
    body = json.dumps({
        "model": "claude-sonnet-4-5", "max_tokens": 1024,
        "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "x",
                         "authorization_token": "S-mcp"}],
        "tools": [{"type": "mcp", "server_label": "s", "server_url": "https://m",
                   "headers": {"Authorization": "Bearer S-bearer", "X-Api-Key": "S-xkey", "X-Custom-Token": "S-tok",
                               "Accept": "application/json"}}],
    }, separators=(",", ":"))
    out = DEFAULTS.json(body)
    assert out == hidden(body, '"S-mcp"', '"Bearer S-bearer"', '"S-xkey"', '"S-tok"')
    assert '"Accept":"application/json"' in out and '"max_tokens":1024' in out


def test_token_counts_limits_and_tool_properties_named_key_survive():
    body = json.dumps({
        "model": "gpt-4o", "max_tokens": 5, "max_output_tokens": 6, "max_completion_tokens": 7, "top_logprobs": 3,
        "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": 0}]}]},
        "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3,
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"key": {"type": "string"}, "token": {"type": "string"},
                                             "secret_santa": {"type": "boolean"}},
            "required": ["key"]}}}],
        "keys": ["a"], "secrets": 2, "api": "v1", "passwords_checked": 4,
    })
    assert DEFAULTS.json(body) == body
    assert DEFAULTS.event_stream(event_stream(body, USAGE)) == event_stream(body, USAGE)


def test_key_is_a_secret_inside_authentication_only():
    body = ('{"tools":[{"function":{"parameters":{"properties":{"key":{"type":"string"}}}}}],'
            '"authentication":{"type":"api_key","key":"S1","token":"S2","credentials":{"u":1}},'
            '"other":{"authentication":"Bearer S3"},"x":{"authentication":null}}')
    assert DEFAULTS.json(body) == hidden(body, '"S1"', '"S2"', '{"u":1}', '"Bearer S3"')


def test_escaped_key_names_are_read_as_what_they_spell():
    body = '{"api\\u005fkey": "S1", "\\u0061ccess_token": "S2", "client\\u005Fsecret": "S3", "caf\\u00e9": 1}'
    assert DEFAULTS.json(body) == hidden(body, '"S1"', '"S2"', '"S3"')
    stream = event_stream('{"pass\\u0077ord":"S4","n":"\\u00e9"}')
    assert DEFAULTS.event_stream(stream) == hidden(stream, '"S4"')


def test_nested_arrays_and_objects():
    body = '{"a": [[{"b": {"password": "S1"}}, {"secret": ["S2", {"deep": 1}]}], 3], "c": {"d": [{"api_key": 42}]}}'
    assert DEFAULTS.json(body) == hidden(body, '"S1"', '["S2", {"deep": 1}]', "42")


def test_spacing_order_and_escapes_are_kept():
    body = '{ "z" : "\\u00e9\\n",\r\n\t"password"  :\n  "S1" ,  "a":[ 1 ,2 ] , "emoji": "😀"}  \n'
    assert DEFAULTS.json(body) == hidden(body, '"S1"')


def test_null_stays_null():
    body = '{"client_secret":null,"api_key":"S1"}'
    assert DEFAULTS.json(body) == '{"client_secret":null,"api_key":"[REDACTED]"}'


@pytest.mark.parametrize("body", [
    "",
    "error code: 502",
    'upstream said "password": "hunter2" in plain text',
    "client_secret=abc&grant_type=client_credentials",
    "<html><body>api_key: x</body></html>",
    "[binary 1024 bytes, audio/wav]",
    '"just a string with \\"api_key\\": 1"',
])
def test_bodies_that_are_not_json_are_left_alone(body):
    assert DEFAULTS.json(body) is body


def test_a_body_cut_short_loses_the_secret_it_was_cut_in():
    """r4u_max_body_bytes cuts a body anywhere: the fallback takes a cut value to the end."""
    body = '{"model":"gpt-4o","api_key":"sk-abcdefghijklmnop","authentication":{"type":"api_key","key":"S2"}}'
    for cut in range(len(body)):
        out = DEFAULTS.json(body[:cut])
        assert "abcdefgh" not in out and "S2" not in out, (cut, out)
    assert DEFAULTS.json(body[:40]) == '{"model":"gpt-4o","api_key":"[REDACTED]"'


def test_json_spread_over_data_lines_falls_back_to_each_line():
    stream = 'data: {"a": 1,\ndata:  "api_key": "S1",\ndata: "client_secret": {"value": "S2"}}\n\n'
    assert DEFAULTS.event_stream(stream) == hidden(stream, '"S1"', '{"value": "S2"}')


def test_event_stream_line_forms():
    """CRLF and CR line ends, `data:` without its space, event names and ids stay as they are."""
    stream = ('event: session.created\r\nid: 1\r\ndata:{"client_secret":{"value":"S1"}}\r\n\r\n'
              'data: {"n":1}\r'
              'data: {"password":"S2"}\r\r'
              ': comment "secret": "S3"\n\n')
    assert DEFAULTS.event_stream(stream) == hidden(stream, '{"value":"S1"}', '"S2"', '"S3"')


def test_json_values_in_a_row():
    body = '{"api_key":"S1"}\n{"n":1}\n{"password":"S2"}\n'
    assert DEFAULTS.json(body) == hidden(body, '"S1"', '"S2"')


def test_nesting_too_deep_to_walk_still_loses_its_secret():
    body = "[" * 5000 + '{"api_key": "S1"}' + "]" * 5000
    assert DEFAULTS.json(body) == hidden(body, '"S1"')


def test_long_texts_are_prechecked_in_windows_that_cut_no_key_out(monkeypatch):
    """The pre-check reads a long text window by window: wherever a cut falls, no key is lost,
    nor one spelled all in escapes, nor one whose colon is far behind a run of blanks."""
    monkeypatch.setattr(redact, "WINDOW", 16)
    keys = ['"api_key"', '"\\u0061\\u0070\\u0069\\u005f\\u006b\\u0065\\u0079"', '"secret"' + " " * 40 + "\n"]
    for key in keys:
        for pad in range(60):
            body = '{"messages": "' + "x" * pad + '", ' + key + ': "S1"}'
            assert DEFAULTS.json(body) == hidden(body, '"S1"'), (key, pad)
            stream = event_stream(body.replace("\n", " "))
            assert DEFAULTS.event_stream(stream) == hidden(stream, '"S1"'), (key, pad)


def test_a_body_still_in_pieces_is_prechecked_as_the_joined_one(monkeypatch):
    """The spool writer pre-checks a big stream without joining it: its windows are slices of
    the pieces, and a key is found wherever the pieces and the windows cut it; only then is the
    body joined and redacted."""
    from array import array
    from itertools import accumulate

    from r4u_mitm.spool import UnjoinedBody

    monkeypatch.setattr(redact, "WINDOW", 16)
    keys = ['"api_key"', '"\\u0061\\u0070\\u0069\\u005f\\u006b\\u0065\\u0079"', '"secret"' + " " * 40]
    for key in keys:
        for pad in range(40):
            body = event_stream('{"messages": "' + "x" * pad + '", ' + key + ': "S1"}').encode()
            for size in (1, 3, 7):
                pieces = [body[i:i + size] for i in range(0, len(body), size)]
                ends = array("Q", accumulate(map(len, pieces)))
                out, moved = redact.redact_raw(UnjoinedBody(pieces, ends), ends, stream=True, redactor=DEFAULTS)
                assert out == hidden(body.decode(), '"S1"').encode() and moved[-1] == len(out), (key, pad, size)
    clean = UnjoinedBody([b"data: ", CHUNK.encode(), b"\n\n"], [6, 6 + len(CHUNK), 8 + len(CHUNK)])
    assert redact.redact_raw(clean, clean.ends, stream=True, redactor=DEFAULTS) == (clean, clean.ends)


def test_extra_names_match_as_the_defaults_do():
    custom = body_redactor(("session_ticket", "myToken", "", " _ "))
    body = ('{"session_ticket":"S1","SessionTicket":"S2","session-ticket":"S3","my_token":"S4","MYTOKEN":"S5",'
            '"ticket":1}')
    assert custom.json(body) == hidden(body, *(f'"S{i}"' for i in range(1, 6)))
    assert DEFAULTS.json(body) == body


def test_header_rule_is_the_one_for_http_headers():
    assert is_secret_header("X-Api-Key") and not is_secret_header("x-ratelimit-remaining-tokens")


def test_the_precheck_reads_the_bytes_a_text_was_decoded_from(monkeypatch):
    """Given the UTF-8 bytes a text was decoded from, the pre-check reads them rather than the
    text encoded again, window by window alike (cut in bytes, not characters, with characters of
    two to four bytes around), and where they did not decode the text has U+FFFD."""
    monkeypatch.setattr(redact, "WINDOW", 16)
    keys = ['"api_key"', '"\\u0061\\u0070\\u0069\\u005f\\u006b\\u0065\\u0079"', '"secret"' + " " * 40 + "\n"]
    for key in keys:
        for pad in range(40):
            body = '{"messages": "' + ("é😊北" * pad)[:pad] + '", ' + key + ': "S1"}'
            assert DEFAULTS.json(body, body.encode()) == hidden(body, '"S1"'), (key, pad)
            stream = event_stream(body.replace("\n", " "))
            assert DEFAULTS.event_stream(stream, stream.encode()) == hidden(stream, '"S1"'), (key, pad)
    raw = b'{"note": "\xff\xfe caf\xc3\xa9", "api_key": "S1", "password": "S2'
    text = raw.decode("utf-8", "replace")
    assert DEFAULTS.json(text, raw) == '{"note": "\ufffd\ufffd café", "api_key": "[REDACTED]", "password": "[REDACTED]"'
    clean = event_stream('{"note": "café \\u00e9 😊"}', CHUNK, USAGE)
    assert DEFAULTS.event_stream(clean, clean.encode()) is clean


# -- property: arbitrary JSON documents ----------------------------------------------------------

SECRET_NAMES = ["api_key", "apiKey", "API-KEY", "client_secret", "clientSecret", "password", "Password",
                "access_token", "refresh_token", "authorization", "Authorization", "authorization_token",
                "connection_string", "encoded_api_key", "secret", "x-api-key", "private_key", "id_token"]
PLAIN_NAMES = ["key", "token", "max_tokens", "max_output_tokens", "max_completion_tokens", "total_tokens",
               "prompt_tokens", "top_logprobs", "type", "username", "name", "content", "keys", "value",
               "expires_at", "Accept", "secrets", "credentials"]
CONTAINERS = ["authentication", "Authentication", "headers", "Headers"]
AUTH_PARTS = ("key", "token", "secret", "password", "credential")
# keys without ASCII letters can never be secret names; with ensure_ascii they carry \u escapes
OTHER_KEYS = st.text(st.characters(exclude_characters="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
                     max_size=6)
KEYS = st.one_of(st.sampled_from(SECRET_NAMES + PLAIN_NAMES + CONTAINERS), OTHER_KEYS)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.sampled_from(SECRET_NAMES + CONTAINERS))
DOCS = st.dictionaries(KEYS, st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25,
), max_size=6)
LAYOUTS = st.sampled_from([
    {}, {"indent": 2}, {"indent": 0}, {"indent": "\t"}, {"separators": (",", ":")},
    {"separators": (" , ", " : ")}, {"indent": 1, "separators": (",", " :  ")},
])


def expected(value, parent=None):
    """The document as redaction must leave it (the rules of redact.py's docstring, restated)."""
    if isinstance(value, list):
        return [expected(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        low = key.lower()
        secret = (key in SECRET_NAMES
                  or (parent == "authentication" and any(p in low for p in AUTH_PARTS))
                  or (parent == "headers" and is_secret_header(key)))
        if secret or (low == "authentication" and not isinstance(v, (dict, list))):
            out[key] = None if v is None else REDACTED
        else:
            out[key] = expected(v, low if low in ("authentication", "headers") and isinstance(v, dict) else None)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS, layout=LAYOUTS, ascii_only=st.booleans(), escape=st.booleans())
def test_any_document_stays_valid_json_with_exactly_its_secrets_replaced(doc, layout, ascii_only, escape):
    text = json.dumps(doc, ensure_ascii=ascii_only, **layout)
    if escape:  # some secret names spelled with escapes, as any JSON encoder may write them
        text = text.replace('"api_key"', '"api\\u005fkey"').replace('"password"', '"p\\u0061ssword"')
    out = DEFAULTS.json(text)
    assert json.loads(out) == expected(doc)
    if expected(doc) == doc:
        assert out == text
    if layout.get("indent") is None:  # one line: the same document as a stream event
        stream = event_stream(text)
        redacted = DEFAULTS.event_stream(stream)
        assert json.loads(redacted.split("\n\n")[0].removeprefix("data: ")) == expected(doc)
        assert redacted.endswith("\n\ndata: [DONE]\n\n")
