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
        assert "r4u-mitm loaded: tracing api.openai.com, *.openai.azure.com -> http://127.0.0.1:9" in out, out
        assert (tmp_path / "mitmproxy-ca-cert.pem").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
