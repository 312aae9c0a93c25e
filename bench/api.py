"""API throughput: GET /v1/jobs/{id} and POST /v1/jobs at 32 concurrent clients against uvicorn
on Postgres (Redis broker), beside a bare FastAPI endpoint served the same way in the same run.

Last line: `ratio: X.XX` = job-status requests/s over the bare endpoint's (aim: at least 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("ALIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("ALIGND_TEST_REDIS", "redis://127.0.0.1:6379") + "/14"

BARE_APP = '''
from fastapi import FastAPI
app = FastAPI()

@app.get("/bare/{item_id}")
def bare(item_id: str) -> dict:
    return {"id": item_id, "object": "bare", "status": "ok"}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server on {port} did not start: {proc.stderr.read().decode()[-2000:]}")


class Connection:
    """A minimal keep-alive HTTP/1.1 client: the load generator shares the CPU with the servers,
    so it must cost far less per request than the endpoints it measures."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        await self.writer.drain()
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


def build_request(method: str, path: str, host: str, headers: dict[str, str], body: dict | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive",
             *(f"{k}: {v}" for k, v in headers.items())]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def load(url: str, *, method: str, concurrency: int, seconds: float, headers: dict[str, str],
               body: dict | None = None) -> dict[str, float]:
    target = httpx.URL(url)
    raw = build_request(method, target.raw_path.decode(), f"{target.host}:{target.port}", headers, body)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop() -> None:
        nonlocal errors
        connection = Connection(target.host, target.port)
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            status = await connection.request(raw)
            latencies.append(time.perf_counter() - start)
            errors += status >= 400
        connection.writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))], "requests": len(latencies),
            "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    db = f"alignd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    home = Path(tempfile.mkdtemp(prefix="alignd-bench-"))
    env = {**os.environ, "ALIGND_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0].replace(
        "postgresql://", "postgresql+psycopg://") + f"/{db}", "ALIGND_BROKER_URL": REDIS,
        "ALIGND_HOME": str(home), "ALIGND_MODEL_ROOT": str(home / "models")}
    (home / "bare_app.py").write_text(BARE_APP)
    procs = []
    try:
        subprocess.run([sys.executable, "-m", "alignd.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        key = subprocess.run([sys.executable, "-m", "alignd.cli", "keys", "create", "--tenant", "bench"], env=env,
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        api_port, bare_port = free_port(), free_port()
        procs.append(serve([sys.executable, "-m", "alignd.cli", "api", "--port", str(api_port)], env, api_port))
        procs.append(serve([sys.executable, "-m", "uvicorn", "--app-dir", str(home), "bare_app:app", "--port",
                            str(bare_port), "--no-access-log", "--log-level", "warning"], env, bare_port))
        auth = {"Authorization": f"Bearer {key}"}
        api = f"http://127.0.0.1:{api_port}"
        prompts = "\n".join(f'{{"prompt": "prompt {i}"}}' for i in range(20)).encode()
        prompt_set = httpx.post(f"{api}/v1/prompt-sets", files={"file": ("p.jsonl", prompts)}, headers=auth).json()
        job_body = {"base_model": "mistralai/Mistral-7B-Instruct-v0.2", "prompt_set": prompt_set["id"]}
        job = httpx.post(f"{api}/v1/jobs", json=job_body, headers=auth).json()

        def run(url: str, method: str = "GET", body: dict | None = None) -> dict[str, float]:
            asyncio.run(load(url, method=method, concurrency=args.concurrency, seconds=1.0, headers=auth,
                             body=body))  # warm-up
            return asyncio.run(load(url, method=method, concurrency=args.concurrency, seconds=args.seconds,
                                    headers=auth, body=body))

        bare = run(f"http://127.0.0.1:{bare_port}/bare/{job['id']}")
        status = run(f"{api}/v1/jobs/{job['id']}")
        create = run(f"{api}/v1/jobs", "POST", job_body)
        print(f"{'endpoint':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
        for name, r in (("bare FastAPI GET", bare), ("GET /v1/jobs/{id}", status), ("POST /v1/jobs", create)):
            print(f"{name:<28}{r['rps']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['errors']:>8}")
        print(f"concurrency {args.concurrency}, {args.seconds:.0f}s per endpoint, one uvicorn worker each, "
              f"Postgres + Redis, {os.cpu_count()} CPU cores shared with the load generator")
        print(f"ratio: {status['rps'] / bare['rps']:.2f}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
