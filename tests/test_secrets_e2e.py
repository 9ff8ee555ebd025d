"""No secret reaches R4U, a log or the outbox, by any path; R4U over HTTPS is verified.

Real mitmdump processes with the addon; the app's secret (`SECRET`) travels in every place a key
can: Authorization, api-key, x-api-key, cookies, the URL query (Azure `?api-key=`, Google
`key=`), and through error paths. The upstream's set-cookie values are secrets too. R4U's own
key (`R4U_API_KEY` in mitmdump's environment) must reach R4U as `X_API_KEY` and nowhere else.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import certifi
import httpx
import openai
import pytest

from r4u_mitm.spool import read_stats
from tests.conftest import SECRET, assert_no_secret, traces_for
from tests.harness import Mitmdump, wait_for

R4U_KEY = "r4u-key-SECRET-7d3f9a1c5e2b8d40"
URL_PASSWORD = "r4u-url-PASSWORD-0f8e7d6c"
CHAT = [{"role": "user", "content": "hi"}]
# mitmproxy's own one-line summary of a flow (flow_detail=1): "<client>: <METHOD> <url>"
FLOW_LINE = re.compile(r"^\S+: (GET|POST|PUT|DELETE|PATCH) https?://\S+$")


@pytest.fixture(scope="module")
def r4u_s():
    """A fake R4U of this module's own: every post it gets is this module's."""
    from tests.fakes.r4u import FakeR4U

    fake = FakeR4U()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def sproxy(tmp_path_factory, upstream, r4u_s):
    hosts = ("api.openai.com", "*.openai.azure.com", "api.anthropic.com")
    proxy = Mitmdump(tmp_path_factory.mktemp("secrets"), r4u_url=r4u_s.url, upstream_port=upstream.port,
                     env={"R4U_API_KEY": R4U_KEY}, args=tuple(a for h in hosts for a in ("--set", f"r4u_hosts={h}")))
    with proxy:
        yield proxy


def secrets_in(data: bytes | str, *secrets: str) -> list[str]:
    """The secrets found in `data`, whole or in part (their first or last 12 characters: a
    truncated line still leaks)."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return [s for s in secrets if s in text or s[:12] in text or s[-12:] in text]


def outbox_bytes(proxy: Mitmdump) -> bytes:
    files = [proxy.outbox, Path(f"{proxy.outbox}-wal"), Path(f"{proxy.outbox}-shm")]
    return b"".join(f.read_bytes() for f in files if f.exists())


def test_no_secret_reaches_r4u_the_log_or_the_outbox(sproxy, r4u_s, upstream, monkeypatch):
    tag = uuid.uuid4().hex
    for key, value in sproxy.client_env().items():
        monkeypatch.setenv(key, value)
    r4u_s.hang(None)  # hold every post: the records wait in the outbox while we look at its bytes
    cookies_from_upstream: list[str] = []
    try:
        # 1. The openai SDK: Authorization: Bearer SECRET, streamed and not, and an error answer.
        sdk = openai.OpenAI(api_key=SECRET, max_retries=0)
        sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, extra_headers={"X-R4U-Test": tag})
        list(sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                         extra_headers={"X-R4U-Test": tag}))
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list(extra_headers={"X-R4U-Test": tag, "x-fake": "status=401"})
        # 2. Azure: api-key header, and the key in the query as some deployments take it.
        azure = openai.AzureOpenAI(api_key=SECRET, api_version="2024-10-21", max_retries=0,
                                   azure_endpoint="https://myres.openai.azure.com")
        azure.chat.completions.create(model="gpt-4o", messages=CHAT, extra_headers={"X-R4U-Test": tag},
                                      extra_query={"api-key": SECRET})
        # 3. Every other header and query form, by hand; and error paths (a stream cut by the
        #    upstream, a client that hangs up) on URLs that carry the key.
        with httpx.Client(proxy=sproxy.url, verify=str(sproxy.ca_file), timeout=30) as client:
            base = {"X-R4U-Test": tag}
            for url, extra in [
                ("https://api.openai.com/v1/models?key=" + SECRET, {"x-api-key": SECRET}),
                ("https://api.openai.com/v1/models?api_key=" + SECRET + "&limit=2", {"cookie": f"session={SECRET}; theme=dark"}),
                ("https://api.openai.com/v1/models?token=" + SECRET, {"openai-api-key": SECRET, "x-goog-api-key": SECRET,
                                                                     "x-auth-token": SECRET}),
                ("https://api.anthropic.com/v1/models", {"anthropic-api-key": SECRET, "x-api-key": SECRET}),
            ]:
                r = client.get(url, headers={**base, **extra})
                cookies_from_upstream += [v.split(";")[0].split("=", 1)[1] for k, v in r.headers.multi_items()
                                          if k == "set-cookie"]
            with pytest.raises(httpx.HTTPError):
                with client.stream("POST", "https://api.openai.com/v1/chat/completions?api-key=" + SECRET,
                                   json={"model": "gpt-4o-mini", "stream": True, "messages": CHAT},
                                   headers={**base, "authorization": f"Bearer {SECRET}",
                                            "x-fake": "stream=openai_chat/basic.sse;cut_after=3"}) as r:
                    r.read()
            with client.stream("POST", "https://api.openai.com/v1/chat/completions?key=" + SECRET,
                               json={"model": "gpt-4o-mini", "stream": True, "messages": CHAT},
                               headers={**base, "authorization": f"Bearer {SECRET}",
                                        "x-fake": "stream=openai_chat/basic.sse;delay_ms=100"}) as r:
                next(r.iter_raw())  # then hang up
        assert len(cookies_from_upstream) >= 8

        # The outbox holds the 10 records now (R4U holds every post): its raw bytes, WAL included.
        wait_for(lambda: read_stats(sproxy.outbox)["pending"] >= 10, what="the 10 records in the outbox")
        assert tag.encode() in outbox_bytes(sproxy)  # a positive control: records are readable there
        assert secrets_in(outbox_bytes(sproxy), SECRET, R4U_KEY, *cookies_from_upstream) == []
    finally:
        r4u_s.clear_faults()

    traces = traces_for(r4u_s, tag, 10, timeout=30)
    # What R4U got: records, and the posts' own headers.
    assert secrets_in(repr(traces), SECRET, R4U_KEY, *cookies_from_upstream) == []
    assert_no_secret(traces)
    for trace in traces:
        for name, value in {**trace["request_headers"], **trace["response_headers"]}.items():
            if name in ("authorization", "api-key", "x-api-key", "cookie", "set-cookie", "openai-api-key",
                        "anthropic-api-key", "x-goog-api-key", "x-auth-token"):
                assert value == "[REDACTED]", name
    urls = {t["metadata"].get("upstream_url", t["metadata"]["url"]) for t in traces}
    for expected in ("https://api.openai.com/v1/models?key=[REDACTED]",
                     "https://api.openai.com/v1/models?api_key=[REDACTED]&limit=2",
                     "https://api.openai.com/v1/models?token=[REDACTED]",
                     "https://myres.openai.azure.com/openai/deployments/gpt-4o/chat/completions"
                     "?api-version=2024-10-21&api-key=[REDACTED]"):
        assert expected in urls, urls
    errors = [t["error"] for t in traces if t["error"]]
    assert any(e.startswith("upstream failed after 3 events") for e in errors)
    assert any(e.startswith("client aborted") for e in errors)
    assert any(e.startswith("HTTP 401") for e in errors)
    posts = [p for p in r4u_s.posts if p.path == "/v1/http-traces"]
    assert posts and all(p.headers.get("x_api_key") == R4U_KEY for p in posts)
    assert secrets_in(repr([p.headers for p in posts]), SECRET, *cookies_from_upstream) == []

    # After a stop, the outbox file (and anything left of its WAL) still holds no secret.
    sproxy.stop()
    assert secrets_in(outbox_bytes(sproxy), SECRET, R4U_KEY, *cookies_from_upstream) == []
    assert read_stats(sproxy.outbox)["pending"] == 0

    # mitmdump's log: never R4U's key, never a header or cookie secret; the addon's own lines
    # never any secret. mitmproxy's own one-line flow summaries (flow_detail=1, the default)
    # print the request URL as it is, query included, cut at ~80 characters: the only place a
    # query key shows up, whole or in part (`--set flow_detail=0` turns those lines off).
    log = sproxy.log()
    assert secrets_in(log, R4U_KEY, *cookies_from_upstream) == []
    leaking = [line for line in log.splitlines() if secrets_in(line, SECRET)]
    assert leaking and all(FLOW_LINE.match(line) and "?" in line for line in leaking), leaking
    assert not [line for line in log.splitlines() if "r4u-mitm" in line and secrets_in(line, SECRET)]


def test_a_password_in_the_r4u_url_stays_out_of_the_log(tmp_path, upstream, r4u_s):
    url = r4u_s.url.replace("http://", f"http://r4u-user:{URL_PASSWORD}@")
    with Mitmdump(tmp_path, r4u_url=url, upstream_port=upstream.port) as proxy:
        pass
    assert URL_PASSWORD not in proxy.log()


def run_one_request(proxy: Mitmdump, monkeypatch, tag: str) -> None:
    for key, value in proxy.client_env().items():
        monkeypatch.setenv(key, value)
    openai.OpenAI(api_key=SECRET, max_retries=0).chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, extra_headers={"X-R4U-Test": tag})


def wait_log(proxy: Mitmdump, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, proxy.log(), re.I)):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{proxy.log()[-2000:]}"
        time.sleep(0.1)
    return m.group(0)


def tls_posts(upstream) -> list[dict]:
    return [r for r in list(upstream.requests) if r["path"].startswith("/v1/http-traces")]


def test_r4u_over_https_with_an_untrusted_certificate_is_never_delivered(tmp_path, upstream, monkeypatch):
    """R4U at https://, its certificate self-signed and not in `r4u_ca_file` (here: certifi's
    bundle). Outcome: no record leaves (the TLS handshake fails before any byte of it), the log
    says `certificate verify failed`, and the records stay pending in the outbox."""
    posts_before = len(tls_posts(upstream))
    with Mitmdump(tmp_path, r4u_url=f"https://127.0.0.1:{upstream.port}", upstream_port=upstream.port,
                  options={"r4u_ca_file": certifi.where()}, env={"R4U_API_KEY": R4U_KEY}) as proxy:
        run_one_request(proxy, monkeypatch, uuid.uuid4().hex)
        wait_log(proxy, r"certificate verify failed")
        wait_for(lambda: read_stats(proxy.outbox)["pending"] == 1, what="the record in the outbox")
    assert "1 trace(s) pending in" in proxy.log()  # the deliverer's drain tries, too, after the proxy is gone
    assert read_stats(proxy.outbox)["pending"] == 1
    assert len(tls_posts(upstream)) == posts_before
    assert R4U_KEY not in proxy.log() and not secrets_in(proxy.log(), SECRET)


def test_r4u_over_https_with_its_certificate_in_r4u_ca_file_is_reached(tmp_path, upstream, monkeypatch):
    """The control: the same R4U, its certificate given as `r4u_ca_file`. The posts get through
    TLS (this fake answers them 404, so the records are kept and tried again)."""
    with Mitmdump(tmp_path, r4u_url=f"https://127.0.0.1:{upstream.port}", upstream_port=upstream.port,
                  options={"r4u_ca_file": upstream.cert_file}, env={"R4U_API_KEY": R4U_KEY}) as proxy:
        before = len(tls_posts(upstream))
        run_one_request(proxy, monkeypatch, uuid.uuid4().hex)
        deadline = time.monotonic() + 20
        while len(tls_posts(upstream)) == before:
            assert time.monotonic() < deadline, proxy.log()[-2000:]
            time.sleep(0.1)
        wait_log(proxy, r"answers (HTTP )?404")
    post = tls_posts(upstream)[-1]
    assert post["method"] == "POST" and ("x_api_key", R4U_KEY) in [(k.lower(), v) for k, v in post["headers"]]
    assert read_stats(proxy.outbox)["pending"] == 1
    assert "certificate verify failed" not in proxy.log().lower()


# -- secrets inside bodies (r4u_mitm/pure/redact.py) ------------------------------------------------------

BODY_KEY = "session_ticket"  # the app's own secret field: named with r4u_redact_body_keys


@pytest.fixture(scope="module")
def body_upstream(tmp_path_factory):
    """A fake upstream serving answers whose bodies carry SECRET: a chat stream (events with
    `client_secret`, `api_key` and BODY_KEY next to token counts) and a Realtime client secret."""
    import json

    from tests.fakes.upstream import FakeUpstream

    files = tmp_path_factory.mktemp("secret-bodies")
    head = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1778822113, "model": "gpt-4o"}
    events = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
         BODY_KEY: SECRET},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
         "client_secret": {"value": SECRET, "expires_at": 1778822173}},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**head, "choices": [], "api_key": SECRET, "usage": {"prompt_tokens": 31, "completion_tokens": 1,
                                                           "total_tokens": 32, "max_tokens": 50}},
    ]
    (files / "chat_secrets.sse").write_text(
        "".join(f"data: {json.dumps(e, separators=(',', ':'))}\n\n" for e in events) + "data: [DONE]\n\n")
    (files / "client_secret.json").write_text(json.dumps(
        {"value": SECRET, "expires_at": 1778822173,
         "session": {"type": "realtime", "object": "realtime.session", "model": "gpt-realtime"}}, indent=2))
    fake = FakeUpstream(tls=True, streams_dir=files)
    fake.start()
    yield fake
    fake.stop()


def test_secrets_in_bodies_reach_neither_r4u_nor_the_outbox(tmp_path, body_upstream, r4u_s, monkeypatch):
    """An Azure chat with "On Your Data" credentials and the app's own secret field (extra_body),
    answered by a stream whose events carry secrets, and a Realtime client secret: R4U and the
    outbox file get the bodies with those values replaced, token counts and limits kept."""
    import json

    tag = uuid.uuid4().hex
    data_sources = [
        {"type": "azure_search", "parameters": {"endpoint": "https://s.search.windows.net", "index_name": "docs",
                                                "authentication": {"type": "api_key", "key": SECRET}}},
        {"type": "azure_cosmos_db", "parameters": {"index_name": "v", "authentication": {
            "type": "connection_string", "connection_string": f"AccountEndpoint=x;AccountKey={SECRET}"}}},
        {"type": "elasticsearch", "parameters": {"endpoint": "https://es", "authentication": {
            "type": "encoded_api_key", "encoded_api_key": SECRET}}},
    ]
    with Mitmdump(tmp_path, r4u_url=r4u_s.url, upstream_port=body_upstream.port,
                  options={"r4u_redact_body_keys": BODY_KEY}) as proxy:
        for key, value in proxy.client_env().items():
            monkeypatch.setenv(key, value)
        r4u_s.hang(None)  # hold every post: the records wait in the outbox while we read its bytes
        try:
            azure = openai.AzureOpenAI(api_key=SECRET, api_version="2024-10-21", max_retries=0,
                                       azure_endpoint="https://myres.openai.azure.com")
            chunks = list(azure.chat.completions.create(
                model="gpt-4o", messages=CHAT, stream=True, max_tokens=50,
                extra_body={"data_sources": data_sources, BODY_KEY: SECRET},
                extra_headers={"X-R4U-Test": tag, "x-fake": "stream=chat_secrets.sse"}))
            assert chunks[-1].usage.total_tokens == 32  # the app got the answer as it was
            realtime = openai.OpenAI(api_key=SECRET, max_retries=0).realtime.client_secrets.create(
                session={"type": "realtime", "model": "gpt-realtime"},
                extra_headers={"X-R4U-Test": tag, "x-fake": "stream=client_secret.json;content_type=application/json"})
            assert realtime.value == SECRET
            wait_for(lambda: read_stats(proxy.outbox)["pending"] >= 2, what="the 2 records in the outbox")
            assert tag.encode() in outbox_bytes(proxy)  # a positive control: records are readable there
            assert secrets_in(outbox_bytes(proxy), SECRET) == []
        finally:
            r4u_s.clear_faults()
        chat, client_secret = sorted(traces_for(r4u_s, tag, 2), key=lambda t: t["request_path"])
    assert secrets_in(outbox_bytes(proxy), SECRET) == [] and read_stats(proxy.outbox)["pending"] == 0
    assert not secrets_in(proxy.log(), SECRET)
    assert_no_secret(chat, client_secret)

    request = json.loads(chat["request"])
    assert request["max_tokens"] == 50 and request[BODY_KEY] == "[REDACTED]"
    assert [s["parameters"]["authentication"] for s in request["data_sources"]] == [
        {"type": "api_key", "key": "[REDACTED]"},
        {"type": "connection_string", "connection_string": "[REDACTED]"},
        {"type": "encoded_api_key", "encoded_api_key": "[REDACTED]"},
    ]
    served = (body_upstream.streams_dir / "chat_secrets.sse").read_text()
    expected = served.replace(f'{{"value":"{SECRET}","expires_at":1778822173}}', '"[REDACTED]"')
    assert chat["response"] == expected.replace(f'"{SECRET}"', '"[REDACTED]"')  # every other byte as served
    assert chat["metadata"]["usage"]["total_tokens"] == 32 and chat["metadata"]["stream_complete"] is True
    assert '"usage":{"prompt_tokens":31,"completion_tokens":1,"total_tokens":32,"max_tokens":50}' in chat["response"]

    assert client_secret["request_path"] == "/v1/realtime/client_secrets"
    assert json.loads(client_secret["response"])["value"] == "[REDACTED]"
    assert json.loads(client_secret["response"])["expires_at"] == 1778822173
