"""A running alignd: the API under uvicorn, a GPU-queue worker and a default-queue worker with the
scheduler, each its own process, on the session's Postgres and Redis and the tiny models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from alignd.processes import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "alignd.cli", *argv], env=self.env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def migrate(self) -> None:
        subprocess.run([sys.executable, "-m", "alignd.cli", "db", "upgrade"], env=self.env, cwd=ROOT, check=True,
                       capture_output=True)

    def start_api(self) -> None:
        self._spawn("api", "api", "--port", str(self.port))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"API did not start:\n{self.log('api')}")

    def start_gpu_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn("gpu-worker", "worker", "--queues", "gpu")

    def start_default_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn("default-worker", "worker", "--queues", "default", "--beat")

    def start_rerank_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn("rerank-worker", "worker", "--queues", "rerank")

    def start_model_server(self) -> None:
        """The embedded model server, on the port of the stack's ALIGND_MODEL_SERVER_URL."""
        url = self.env["ALIGND_MODEL_SERVER_URL"]
        self._spawn("model-server", "model-server")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"model server did not start:\n{self.log('model-server')}")

    def kill(self, name: str) -> None:
        """SIGKILL, as the OOM killer or a lost node would: no cleanup, no acknowledgement."""
        proc = self.processes.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def terminate(self, name: str, timeout: float = 60) -> float:
        """SIGTERM (Celery's warm shutdown, as Kubernetes stops a pod); returns seconds to exit."""
        proc = self.processes.pop(name)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
        return time.monotonic() - started

    def stop(self) -> None:
        for name in list(self.processes):
            stop_process_group(self.processes.pop(name), timeout=20)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def key(self, tenant: str) -> str:
        out = subprocess.run([sys.executable, "-m", "alignd.cli", "keys", "create", "--tenant", tenant],
                             env=self.env, cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]


@contextmanager
def isolated_stack(model_root: Path, home: Path, *, redis_offset: int, **settings: str) -> Iterator[Stack]:
    """A stack on its own Postgres database and Redis index (the API tests truncate theirs between
    tests), torn down with its database afterwards. Starts nothing: the caller picks processes."""
    from tests.conftest import REDIS_URL, create_pg_database, drop_pg_database

    db_name, database_url = create_pg_database()
    broker_url = f"{REDIS_URL}/{1 + (os.getpid() + redis_offset) % 15}"
    redis.Redis.from_url(broker_url).flushdb()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")},
        "ALIGND_DATABASE_URL": database_url,
        "ALIGND_BROKER_URL": broker_url,
        "ALIGND_HOME": str(home),
        "ALIGND_MODEL_ROOT": str(model_root),
        "ALIGND_ARTIFACT_ROOT": str(home / "artifacts"),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **settings,
    }
    stack = Stack(env=env, logs=home)
    try:
        stack.migrate()
        yield stack
    finally:
        stack.stop()
        drop_pg_database(db_name)


@dataclass
class Client:
    stack: Stack
    key: str

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.stack.url}{path}", headers={"Authorization": f"Bearer {self.key}"},
                             timeout=30, **kwargs)

    def upload(self, prompts: list[str]) -> dict[str, Any]:
        data = "\n".join(f'{{"prompt": "{p}"}}' for p in prompts).encode()
        response = self.call("POST", "/v1/prompt-sets", files={"file": ("prompts.jsonl", data)})
        assert response.status_code == 201, response.text
        return response.json()

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.call("POST", "/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, *, until: Any = None, timeout: float = 600) -> dict[str, Any]:
        until = until or (lambda j: j["status"] in TERMINAL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id)} after {timeout}s:\n"
                             f"{self.stack.log('gpu-worker')}")

    def rounds(self, job_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/v1/jobs/{job_id}/rounds").json()["data"]

    def events(self, job_id: str) -> list[dict[str, Any]]:
        events, after = [], None
        while True:
            page = self.call("GET", f"/v1/jobs/{job_id}/events",
                             params={"limit": 1000, **({"after": after} if after else {})}).json()
            events += page["data"]
            if not page["has_more"]:
                return events
            after = events[-1]["id"]
