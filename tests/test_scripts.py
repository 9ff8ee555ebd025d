"""The commands the README gives a new user."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.harness import ROOT, free_port


def test_demo_shows_the_whole_path():
    run = subprocess.run([ROOT / "scripts" / "demo"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "R4U received:" in out
    traces = [line for line in out.splitlines() if line.startswith("  POST https://api.openai.com/v1/chat/completions")]
    assert len(traces) == 3
    assert sum("stream=True complete=True" in line for line in traces) == 1
    assert all("authorization=[REDACTED]" in line for line in traces)
    assert "finish=tool_calls" in out and "'session': 'demo'" in out


def test_scripts_run_starts_the_proxy_with_the_addon(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen([ROOT / "scripts" / "run", "-p", str(port), "--listen-host", "127.0.0.1",
                             "--set", f"confdir={tmp_path}", "--set", "r4u_api_url=http://127.0.0.1:9"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline, out = time.monotonic() + 120, ""
        while "r4u-mitm loaded" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "r4u-mitm loaded: tracing api.openai.com, *.openai.azure.com, api.anthropic.com -> http://127.0.0.1:9" in out, out
        assert (tmp_path / "mitmproxy-ca-cert.pem").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_readme_curl_through_the_proxy(proxy, r4u, tag):
    from tests.conftest import SECRET, traces_for

    run = subprocess.run(["curl", "-sS", "--proxy", proxy.url, "--cacert", str(proxy.ca_file),
                          "https://api.openai.com/v1/models", "-H", f"Authorization: Bearer {SECRET}",
                          "-H", f"X-R4U-Test: {tag}"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert '"object":"list"' in run.stdout.replace(" ", "")
    (trace,) = traces_for(r4u, tag)
    assert trace["request_headers"]["authorization"] == "[REDACTED]"


def test_readme_node_app_in_reverse_mode(tmp_path, upstream, r4u, tag):
    """Any Node app, unchanged, through reverse mode: only its base URL points at mitmproxy."""
    import shutil

    from tests.conftest import SECRET, traces_for
    from tests.harness import Mitmdump

    if shutil.which("node") is None:
        import pytest

        pytest.skip("node is not installed")
    app = tmp_path / "app.mjs"
    app.write_text(
        "const base = process.env.OPENAI_BASE_URL;\n"
        "const r = await fetch(`${base}/chat/completions`, {method: 'POST', headers: {\n"
        "  'content-type': 'application/json', authorization: `Bearer ${process.env.OPENAI_API_KEY}`,\n"
        f"  'x-r4u-test': '{tag}'}},\n"
        "  body: JSON.stringify({model: 'gpt-4o-mini', stream: true, messages: [{role: 'user', content: 'hi'}]})});\n"
        "const text = await r.text();\n"
        "console.log(text.includes('data: [DONE]') ? 'stream ok' : 'stream broken');\n"
    )
    with Mitmdump(tmp_path / "proxy", r4u_url=r4u.url, upstream_port=upstream.port,
                  args=("--mode", "reverse:https://api.openai.com")) as proxy:
        env = {**os.environ, "OPENAI_BASE_URL": f"{proxy.url}/v1", "OPENAI_API_KEY": SECRET}
        run = subprocess.run(["node", str(app)], capture_output=True, text=True, timeout=60, env=env)
    assert run.stdout.strip() == "stream ok", run.stderr
    (trace,) = traces_for(r4u, tag)
    assert trace["metadata"]["stream_complete"] is True


def test_r4u_mitm_web_runs_mitmweb_with_the_addon(tmp_path):
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "r4u-mitm"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.Popen([cli, "web", "-p", str(free_port()), "--listen-host", "127.0.0.1",
                             "--set", f"web_port={free_port()}", "--set", "web_open_browser=false",
                             "--set", f"confdir={tmp_path}", "--set", "r4u_api_url=http://127.0.0.1:9"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline, out = time.monotonic() + 60, ""
        while "r4u-mitm loaded" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "r4u-mitm loaded" in out and "Web server listening" in out, out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
