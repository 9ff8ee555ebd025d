"""mitmweb, for real, in a real browser: the openai SDK streams a chat through mitmweb with the
addon; headless Chromium (Playwright) opens mitmweb's UI, opens the flow and its response, and
must see our event-stream view with the assembled assistant text, the trace id and the timing
(computed by the view from the flow: the same as the record's). A trace R4U refuses says why in
its flow's comment.

The browser test needs a Chromium binary (Debian: `apt-get install chromium`); it is skipped,
saying so, without one.
The screenshot goes to the test's tmp dir; with R4U_UPDATE_SCREENSHOT=1 it also replaces
docs/mitmweb-sse-view.png.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

import openai
import pytest

from r4u_mitm.proxy.contentview import NAME
from tests.conftest import SECRET, assert_no_secret, headers, stream_bytes, traces_for
from tests.harness import ROOT, Mitmdump, free_port
from tests.test_tracer_e2e import CHAT, chat_text

CHROMIUM = next((p for p in (os.environ.get("R4U_TEST_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and os.path.isfile(p)), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "docs" / "mitmweb-sse-view.png"
STREAM = "openai_chat/basic.sse"

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def mitmweb(tmp_path_factory, upstream, r4u):
    """mitmweb with the addon. mitmweb 12 always asks for a token (a random one unless
    `web_password` is set): the test sets its own and passes it as ?token= once."""
    web_port, password = free_port(), secrets.token_hex(16)
    proc = Mitmdump(tmp_path_factory.mktemp("mitmweb"), r4u_url=r4u.url, upstream_port=upstream.port,
                    program="mitmweb", options={"web_open_browser": "false", "web_host": "127.0.0.1",
                                                "web_port": web_port, "web_password": password})
    with proc:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", web_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mitmweb's UI is not listening on {web_port}:\n{proc.log()[-3000:]}")
                time.sleep(0.05)
        proc.web = f"http://127.0.0.1:{web_port}"
        proc.web_url = f"{proc.web}/?token={password}"
        proc.web_auth = {"Authorization": f"Bearer {password}"}
        yield proc


def stream_chat(proc: Mitmdump, monkeypatch, **fake) -> str:
    """The app: an unchanged openai SDK, pointed at the proxy by its environment only."""
    with monkeypatch.context() as env:
        for key, value in proc.client_env().items():
            env.setenv(key, value)
        client = openai.OpenAI(api_key=SECRET, max_retries=0)
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                                extra_headers=headers(**fake))
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_a_cut_stream_shows_what_arrived(mitmweb, r4u, tag, monkeypatch):
    """The upstream drops the connection mid-stream: mitmproxy ends the flow with `error`; mitmweb
    (its content API, as the UI calls it) still shows the partial result, marked incomplete.
    Runs first: the browser test then has two flows to pick from with mitmweb's filter."""
    import httpx

    with pytest.raises(Exception):  # httpx's RemoteProtocolError, through the SDK
        stream_chat(mitmweb, monkeypatch, tag=tag, stream=STREAM, cut_after=6)
    (trace,) = traces_for(r4u, tag)
    assert trace["error"] and not trace["error"].startswith("client")
    with httpx.Client(base_url=mitmweb.web, headers=mitmweb.web_auth, timeout=10) as web:
        ours = f"r4u {trace['metadata']['trace_id'][:8]} · "
        for _ in range(100):  # the comment follows the trace's delivery: R4U has it, so soon "delivered"
            (flow,) = [f for f in web.get("/flows").json() if f["comment"].startswith(ours)]
            if flow["comment"] == ours + "delivered":
                break
            time.sleep(0.05)
        assert flow["comment"] == ours + "delivered"
        assert flow["error"]
        shown = web.get(f"/flows/{flow['id']}/response/content/auto.json").json()
    assert shown["view_name"] == NAME
    text = shown["text"]
    assert text.split("\n")[2].startswith("INCOMPLETE: no terminal event")
    result = text[text.index("Assembled result"):text.index("─── Wire timing")]
    assert "Salut" in result and "finish_reason: -" in result


def test_a_dead_lettered_trace_says_why_in_its_comment(mitmweb, r4u, tag, monkeypatch):
    """R4U refuses the record (422): the flow is marked and its comment gives the reason, short,
    as the dead-letter table keeps it (never R4U's answer, which echoes the record)."""
    import httpx

    refused: list[str] = []

    def ours(record: dict) -> bool:
        if record["metadata"].get("properties", {}).get("test") != tag:
            return False
        refused.append(record["metadata"]["trace_id"])
        return True

    r4u.reject(ours)
    try:
        assert stream_chat(mitmweb, monkeypatch, tag=tag, stream=STREAM) == chat_text(stream_bytes(STREAM))
        want = "dead-lettered: HTTP 422: body: Value error, rejected by the fake"
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=mitmweb.web, headers=mitmweb.web_auth, timeout=10) as web:
            while True:
                flows = [f for f in web.get("/flows").json() if refused and f["comment"].startswith(
                    f"r4u {refused[0][:8]} · ")]
                if flows and flows[0]["comment"].endswith(want) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    finally:
        r4u.clear_faults()
    assert len(flows) == 1, f"R4U refused {refused}; no flow of it says so within 20 s"
    (flow,) = flows
    assert flow["comment"] == f"r4u {refused[0][:8]} · {want}" and flow["marked"]
    assert_no_secret(flow["comment"])


def shown_ms(timing: str, label: str) -> float:
    """A time the view shows, in ms (it rounds: to the ms from 10 ms up, else to 0.1 ms)."""
    return float(re.search(rf"^{label} \(.*\): ([\d.]+) ms$", timing, re.MULTILINE).group(1))


@needs_chromium
def test_mitmweb_shows_the_assembled_stream(mitmweb, r4u, tag, monkeypatch, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    text = stream_chat(mitmweb, monkeypatch, tag=tag, stream=STREAM, delay_ms=5)
    assert text == chat_text(stream_bytes(STREAM)) and text
    (trace,) = traces_for(r4u, tag)
    meta = trace["metadata"]
    trace_id = meta["trace_id"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(15_000)
            page.goto(mitmweb.web_url)

            # Find the flow with mitmweb's own filter, by the trace id in its comment.
            page.get_by_placeholder("Search").fill(f"~comment {trace_id[:8]}")
            row = page.locator("td.col-path", has_text="/v1/chat/completions")
            expect(row).to_have_count(1)
            row.click()
            page.get_by_text("Response", exact=True).click()

            view = page.locator(".contentview")
            expect(view.locator("h5")).to_have_text(NAME)  # chosen automatically ("View: auto")
            body = view.locator("pre")
            expect(body).to_contain_text(text)
            shown = body.inner_text()
            lines = shown.split("\n")
            assert lines[0] == "Chat Completions stream · openai · POST /v1/chat/completions"
            assert lines[1] == f"r4u trace {trace_id}"
            result = shown[shown.index("Assembled result"):shown.index("─── Wire timing")]
            assert f"    {text}" in result.split("\n") and "finish reason: stop" in result
            # The view's timing, computed from the flow when it is opened, is the record's: the
            # same instants (mitmproxy's timestamps, the teed pieces' arrival), rounded.
            timing = shown[shown.index("─── Wire timing"):shown.index("─── Events")]
            ttfb, ttft = shown_ms(timing, "time to first byte"), shown_ms(timing, "time to first token")
            assert abs(ttfb - meta["ttfb_ms"]) <= 1 and abs(ttft - meta["ttft_ms"]) <= 1, (timing, meta)
            assert ttfb <= ttft <= shown_ms(timing, "duration")
            assert f"{meta['events']} events · {meta['response_bytes']} bytes on the wire" in timing
            assert "─── Events (10) ───" in shown and "#10 message: [DONE]" in shown

            page.evaluate("document.querySelector('.contentview').scrollIntoView({block: 'start'})")
            shot = tmp_path / SCREENSHOT.name
            page.screenshot(path=str(shot))

            # The flow's comment carries the trace id: mitmweb's filter finds it.
            page.get_by_text("Comment", exact=True).click()
            expect(page.locator(".flow-detail section")).to_contain_text(f"r4u {trace_id[:8]}")
        finally:
            browser.close()
    if os.environ.get("R4U_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    assert Path(shot).stat().st_size > 10_000
