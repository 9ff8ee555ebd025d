"""Real processes for end-to-end tests and the benchmark: a `mitmdump` with the addon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STREAMS = ROOT / "tests" / "data" / "streams"  # example event streams, written for these tests
ADDON = ROOT / "r4u_mitm" / "addon.py"
ROUTE = ROOT / "tests" / "fakes" / "route.py"
BIN = Path(sys.executable).parent
LOADED = "r4u-mitm loaded"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    """Poll `predicate` until it returns something true, and return that; fail after `timeout`
    seconds. Tests wait for the event they need with this, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Mitmdump:
    """A real mitmdump process, with the r4u addon (unless `addon=False`) and, when
    `upstream_port` is given, the test router that sends upstream connections to a local fake."""

    def __init__(self, workdir: Path, *, r4u_url: str | None = None, upstream_port: int | None = None,
                 options: dict[str, object] | None = None, args: tuple[str, ...] = (),
                 addon: bool = True, program: str = "mitmdump", env: dict[str, str] | None = None,
                 confdir: Path | None = None, addon_file: Path = ADDON) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = confdir or self.workdir / "confdir"
        self.port = free_port()
        self.outbox = self.workdir / "outbox.sqlite"
        self.log_path = self.workdir / f"{program}-{self.port}.log"
        opts: dict[str, object] = {"confdir": self.confdir, "termlog_verbosity": "info"}
        if addon:
            opts.update(r4u_outbox=self.outbox, r4u_drain_seconds=2)
            if r4u_url:
                opts["r4u_api_url"] = r4u_url
        if upstream_port:
            # lazy: connect upstream only when the request is there, so the rerouting keeps the
            # flow's host (api.openai.com) as a real connection would.
            opts.update(fake_upstream=f"127.0.0.1:{upstream_port}", ssl_insecure="true",
                        connection_strategy="lazy")
        opts.update(options or {})
        cmd = [str(BIN / program), "--listen-host", "127.0.0.1", "-p", str(self.port)]
        if addon:
            cmd += ["-s", str(addon_file)]
        if upstream_port:
            cmd += ["-s", str(ROUTE)]
        for key, value in opts.items():
            cmd += ["--set", f"{key}={value}"]
        self.cmd = cmd + list(args)
        self.env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.env["PYTHONUNBUFFERED"] = "1"  # each log line reaches the file at once: tests wait for lines
        self.env.update(env or {})
        self.addon = addon
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)

    def exit_code(self, timeout: float = 30) -> int:
        """Run it when it should refuse to start: wait until it exits by itself; its exit code."""
        self._spawn()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"{self.cmd[0]} still ran after {timeout}s:\n{self.log()[-3000:]}") from None
        finally:
            self._log.close()

    def start(self, timeout: float = 30) -> "Mitmdump":
        self._spawn()
        ready = LOADED if self.addon else "listening at"
        deadline = time.monotonic() + timeout
        while ready not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mitmdump did not say {ready!r} within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self._wait_listening(deadline)
        return self

    def _wait_listening(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mitmdump is not listening on {self.port}:\n{self.log()[-3000:]}")

    def deliverer_pid(self) -> int | None:
        """The pid of the delivery process working on this proxy's outbox, as it says in it."""
        from r4u_mitm.spool import read_stats

        try:
            state = read_stats(self.outbox)["deliverer"]
        except (FileNotFoundError, RuntimeError):
            return None
        return state.get("pid") if state.get("running") else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"mitmdump did not stop on {sig!r} within {timeout}s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client_env(self) -> dict[str, str]:
        """What an unchanged app needs in its environment to go through this proxy."""
        return {"HTTPS_PROXY": self.url, "HTTP_PROXY": self.url, "SSL_CERT_FILE": str(self.ca_file),
                "NO_PROXY": ""}

    def __enter__(self) -> "Mitmdump":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._log.close()
