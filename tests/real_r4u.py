"""The real R4U backend (open-r4u), for the opt-in tests: `R4U_BACKEND=<open-r4u tree>`.

    backend = RealR4U(Path(os.environ["R4U_BACKEND"]), workdir).start()
    ... backend.url, backend.traces(), backend.raw_rows() ...
    backend.stop()

It runs offline, on a fresh SQLite file: the backend's own dependencies (its pyproject.toml,
versions pinned by its uv.lock) go once into a venv under the temporary folder, named by a hash of
those two files, and are reused by later runs; the tables are made from its models; its task
grouping, which would call an LLM, never starts (MIN_CLUSTER_SIZE); it listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from pathlib import Path

from tests.harness import free_port, wait_for

ENV = "R4U_BACKEND"

SCHEMA = """
import asyncio
import app.models  # registers every table
from app.database import engine
from app.models.base import Base

async def main():
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()

asyncio.run(main())
"""


def backend_dir(tree: Path) -> Path:
    """The backend folder of an open-r4u tree (its root or backend/ itself)."""
    for candidate in (tree / "backend", tree):
        if (candidate / "app" / "main.py").is_file() and (candidate / "pyproject.toml").is_file():
            return candidate.resolve()
    raise RuntimeError(f"{ENV}={tree}: no open-r4u backend (backend/app/main.py, pyproject.toml) there")


def venv_python(backend: Path) -> Path:
    """The Python of a venv holding the backend's dependencies; made on first use (minutes)."""
    files = [backend / "pyproject.toml", backend / "uv.lock"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()[:16]
    venv = Path(tempfile.gettempdir()) / f"r4u-mitm-open-r4u-{digest}"
    python, done = venv / "bin" / "python", venv / ".complete"
    if done.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    deps = tomllib.loads(files[0].read_text())["project"]["dependencies"]
    pins = []
    if files[1].exists():
        pins = [f"{p['name']}=={p['version']}" for p in tomllib.loads(files[1].read_text()).get("package", [])
                if "registry" in p.get("source", {})]
    (venv / "constraints.txt").write_text("\n".join(pins) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(venv / "constraints.txt"), *deps],
                   check=True)
    done.touch()
    return python


class RealR4U:
    def __init__(self, tree: Path, workdir: Path) -> None:
        self.backend = backend_dir(tree)
        self.workdir = Path(workdir)
        self.db = self.workdir / "r4u.db"
        self.port = free_port()
        self.log_path = self.workdir / "open-r4u.log"
        self.proc: subprocess.Popen | None = None
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and not k.endswith("_API_KEY")}
        env.update(DATABASE_URL=f"sqlite+aiosqlite:///{self.db}", MIN_CLUSTER_SIZE="1000000",
                   LITELLM_LOCAL_MODEL_COST_MAP="True", OPENAI_BASE_URL="http://127.0.0.1:9/v1",
                   NO_PROXY="*", PYTHONUNBUFFERED="1")
        return env

    def start(self, timeout: float = 60) -> "RealR4U":
        python, env = venv_python(self.backend), self._env()
        subprocess.run([str(python), "-c", SCHEMA], cwd=self.backend, env=env, check=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(python), "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.backend, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"open-r4u exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                return self.get("/health") == {"status": "ok"}
            except OSError:
                return False

        wait_for(up, timeout, "open-r4u's /health")
        return self

    def stop(self) -> None:
        """Kill it and the process it starts: its data is thrown away with the folder, and a
        clean shutdown takes 10 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # its own session: the group is it and its child
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with self._http.open(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def traces(self) -> list[dict]:
        """Every structured trace, newest first (GET /v1/traces, page by page)."""
        found: list[dict] = []
        while page := self.get(f"/v1/traces?limit=100&offset={len(found)}"):
            found += page
        return found

    def raw_rows(self) -> list[dict]:
        """Every raw row (table http_trace), parsed or not, with `metadata` as a dict: a record
        R4U could not parse has no structured trace, only this row."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)) as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM http_trace ORDER BY id")]
        for row in rows:
            row["metadata"] = json.loads(row.pop("http_metadata") or "{}")
        return rows
