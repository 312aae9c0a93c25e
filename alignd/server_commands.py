"""Commands that run alignd's processes: api, worker, up, db upgrade, keys create."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from app.core.config import get_settings

GPU_WORKER_QUEUES = "gpu"
DEFAULT_WORKER_QUEUES = "default"


def register(sub: argparse._SubParsersAction) -> None:
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(handler=run_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="gpu,default",
                        help="comma-separated: gpu, gpu-a100, gpu-h200, default (default: gpu,default)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--beat", action="store_true", help="also run the housekeeping scheduler")
    worker.set_defaults(handler=run_worker)

    up = sub.add_parser("up", help="run everything (database, API, workers) on embedded defaults")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(handler=run_up)

    db = sub.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply Alembic migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=run_db_upgrade)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if new)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(handler=run_keys_create)


def run_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="info", access_log=False)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from workers.celery_app import celery_app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    gpu_work = any(q.startswith("gpu") for q in queues)
    argv = ["worker", "--queues", ",".join(queues), "--loglevel", "INFO", "--without-gossip",
            "--without-mingle", "--prefetch-multiplier", "1"]
    # CUDA does not survive fork, and one GPU runs one job: GPU workers run tasks in-process.
    argv += ["--pool", "solo"] if gpu_work else ["--pool", "threads", "--concurrency", str(max(args.concurrency, 4))]
    if args.beat:
        schedule = get_settings().home / "celerybeat-schedule"
        schedule.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--beat", "--schedule", str(schedule)]
    celery_app.worker_main(argv)
    return 0


def run_db_upgrade(args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade

    upgrade(revision=args.revision)
    print(f"database at {args.revision}")
    return 0


def run_keys_create(args: argparse.Namespace) -> int:
    from app.db.session import session_scope
    from app.services.tenants import create_api_key

    with session_scope() as session:
        issued = create_api_key(session, tenant_name=args.tenant)
        tenant_id, secret = issued.tenant.id, issued.tenant.webhook_secret
    print(f"tenant: {args.tenant} ({tenant_id})")
    print(f"webhook signing secret: {secret}")
    print(issued.key)
    return 0


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "alignd.cli", *argv], env=os.environ.copy())


def run_up(args: argparse.Namespace) -> int:
    """API, a GPU-queue worker and a default-queue worker with the scheduler, until interrupted."""
    from app.db.migrate import upgrade

    upgrade()
    processes = [
        _spawn(["api", "--host", args.host, "--port", str(args.port)]),
        _spawn(["worker", "--queues", GPU_WORKER_QUEUES]),
        _spawn(["worker", "--queues", DEFAULT_WORKER_QUEUES, "--beat"]),
    ]
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"alignd up: API on http://{args.host}:{args.port} (Ctrl-C stops everything)", flush=True)
    try:
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.5)
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [p.args for p in processes if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed and not stopping else 0
