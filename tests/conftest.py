"""Fixtures for the end-to-end tests: a fake OpenAI upstream (TLS), a fake R4U, a real mitmdump
with the addon between them, and the real openai SDK as the app."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.harness import STREAMS, Mitmdump

# What the app uses as its API key: it must never reach R4U, a log or the outbox.
SECRET = "sk-test-SECRET-4f9c2a7e1b3d5f8a0c6e"


class Spooled:
    """Stands in for the spool writer in the addon's unit tests: packs each exchange the addon
    hands over as the spool stores it, and builds its record as the deliverer does (`records`)."""

    def __init__(self):
        self.records = []
        self.lost = 0

    def append(self, exchange, options, kept=0):
        from r4u_mitm.delivery.deliver import build
        from r4u_mitm.spool import pack

        self.records.append(json.loads(build(pack(exchange, options))))

    def close(self, timeout):
        return True


@pytest.fixture
def tracer(tmp_path):
    """The addon under mitmproxy's test context (not running: no writer thread, no deliverer),
    its spool writer replaced by `Spooled`."""
    from mitmproxy.addons.view import View
    from mitmproxy.options import Options
    from mitmproxy.test import taddons

    from r4u_mitm.addon import R4UTracer

    tracer = R4UTracer()
    # a view, as in mitmweb: streamed bodies are restored; a confdir of its own, not ~/.mitmproxy
    with taddons.context(tracer, View(), options=Options(confdir=str(tmp_path))) as tctx:
        tctx.configure(tracer, r4u_outbox=str(tmp_path / "outbox.sqlite"), r4u_api_url="http://127.0.0.1:9")
        tracer.link.writer = Spooled()
        yield tracer, tctx


@pytest.fixture(scope="session")
def upstream():
    from tests.fakes.upstream import FakeUpstream

    fake = FakeUpstream(tls=True)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def r4u():
    """One fake R4U for the session's proxies (tests tell their traces apart by tag)."""
    from tests.fakes.r4u import FakeR4U

    fake = FakeR4U()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def fake():
    """A fake R4U of the test's own, for what counts every request it gets."""
    from tests.fakes.r4u import FakeR4U

    fake = FakeR4U().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def proxy(tmp_path_factory, upstream, r4u):
    with Mitmdump(tmp_path_factory.mktemp("proxy"), r4u_url=r4u.url, upstream_port=upstream.port) as p:
        yield p


@pytest.fixture
def app_env(proxy, monkeypatch):
    """The app's environment: only proxy variables and the CA, as a user would set them."""
    for key, value in proxy.client_env().items():
        monkeypatch.setenv(key, value)
    return proxy


@pytest.fixture
def openai_client(app_env):
    import openai

    return openai.OpenAI(api_key=SECRET, max_retries=0)


@pytest.fixture
def async_openai_client(app_env):
    import openai

    return openai.AsyncOpenAI(api_key=SECRET, max_retries=0)


@pytest.fixture
def tag():
    """A unique X-R4U-Test tag: finds this test's traces among the session's."""
    return uuid.uuid4().hex


def headers(tag: str, **fake: object) -> dict[str, str]:
    """extra_headers for one request: the test tag, and what the fake upstream should do."""
    out = {"X-R4U-Test": tag}
    if fake:
        out["x-fake"] = ";".join(f"{k}={v}" for k, v in fake.items())
    return out


def traces_for(r4u, tag: str, n: int = 1, timeout: float = 20) -> list[dict]:
    """Wait until R4U holds `n` distinct traces tagged `tag`; more than `n` by then fails.
    (Proving that no more will come takes an event: see test_delivery_e2e's `delivered_once`.)

    Delivery is at least once: a post cut by a killed deliverer is sent again by the next one.
    Such a re-send carries the same trace_id and must be the same record."""

    def mine() -> list[dict]:
        by_id: dict[str, dict] = {}
        for t in list(r4u.received):
            if t.get("metadata", {}).get("properties", {}).get("test") == tag:
                first = by_id.setdefault(t["metadata"]["trace_id"], t)
                assert first == t, "a re-sent trace differs from the first"
        return list(by_id.values())

    deadline = time.monotonic() + timeout
    while True:
        found = mine()
        if len(found) >= n:
            assert len(found) == n, f"expected {n} traces for {tag}, got {len(found)}"
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"R4U got {len(found)} of {n} traces tagged {tag} within {timeout}s")
        time.sleep(0.05)


def stream_bytes(name: str) -> bytes:
    return (STREAMS / name).read_bytes()


def assert_no_secret(*things: object) -> None:
    for thing in things:
        text = thing if isinstance(thing, str) else json.dumps(thing, ensure_ascii=False)
        assert SECRET not in text
        assert SECRET[-12:] not in text
