"""Commands that run alignd's processes: api, worker, model-server, vllm, up, db upgrade, keys create."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

from app.core.config import get_settings

GPU_WORKER_QUEUES = "gpu"
DEFAULT_WORKER_QUEUES = "default"
RERANK_WORKER_QUEUES = "rerank"


def register(sub: argparse._SubParsersAction) -> None:
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(handler=run_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="gpu,default",
                        help="comma-separated: gpu, gpu-a100, gpu-h200, default, rerank (default: gpu,default)")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--beat", action="store_true", help="also run the housekeeping scheduler")
    worker.set_defaults(handler=run_worker)

    model_server = sub.add_parser("model-server", help="serve fine-tuned models with transformers (embedded backend)")
    model_server.add_argument("--host", default=None, help="default: the host of ALIGND_MODEL_SERVER_URL")
    model_server.add_argument("--port", type=int, default=None, help="default: the port of ALIGND_MODEL_SERVER_URL")
    model_server.add_argument("--threads", type=int, default=1,
                              help="torch CPU threads (default 1: fastest for small models on a shared CPU)")
    model_server.set_defaults(handler=run_model_server)

    vllm = sub.add_parser("vllm", help="start vLLM's OpenAI server for a base model (multi-LoRA) or a full "
                                       "fine-tune")
    target = vllm.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-model", help="a base model name as jobs give it; serves its jobs' adapters")
    target.add_argument("--model", help="a full fine-tune's name (ft:...), served as its own model")
    vllm.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--tensor-parallel-size", type=int, default=1, metavar="GPUS",
                      help="GPUs one server shards the model over (default 1)")
    vllm.add_argument("--vllm", default="vllm", help="the vllm executable (default: vllm on PATH)")
    vllm.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    vllm.add_argument("extra", nargs=argparse.REMAINDER,
                      help="further vllm serve flags, after -- (not the ones alignd sets itself)")
    vllm.set_defaults(handler=run_vllm)

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


def run_model_server(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    import torch
    import uvicorn

    configured = urlsplit(get_settings().model_server_url)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    uvicorn.run("workers.serving.server:create_app", factory=True, host=args.host or configured.hostname,
                port=args.port or configured.port or 8100, log_level="info", access_log=False)
    return 0


# Flags `alignd vllm` sets itself, refused after `--`: the LoRA limits must be the settings the API
# checks jobs against (ALIGND_VLLM_MAX_LORA_RANK refuses a job whose rank vLLM could not serve),
# the name and address are what ALIGND_VLLM_BASE_URLS points at, and weights load from
# safetensors without remote code.
VLLM_FLAGS_SET_BY_ALIGND = {
    "--enable-lora": "always on for a base model",
    "--max-loras": "ALIGND_VLLM_MAX_LORAS",
    "--max-lora-rank": "ALIGND_VLLM_MAX_LORA_RANK",
    "--load-format": "always safetensors",
    "--trust-remote-code": "never on",
    "--served-model-name": "--base-model / --model",
    "--host": "alignd vllm --host",
    "--port": "alignd vllm --port",
    "--tensor-parallel-size": "alignd vllm --tensor-parallel-size",
    "-tp": "alignd vllm --tensor-parallel-size",
}


def _refused_vllm_flags(extra: list[str]) -> list[str]:
    names = [arg.split("=", 1)[0] for arg in extra]  # --flag value and --flag=value
    return [f"{name} ({VLLM_FLAGS_SET_BY_ALIGND[name]})" for name in names if name in VLLM_FLAGS_SET_BY_ALIGND]


def run_vllm(args: argparse.Namespace) -> int:
    from app.core.errors import AlignError
    from app.core.model_names import ModelNameError, resolve_model_name
    from app.db.session import session_scope
    from app.services.served_models import ensure_registered
    from workers.serving.vllm import VllmServer, environment

    extra = [a for a in args.extra if a != "--"]
    refused = _refused_vllm_flags(extra)
    if refused:
        print(f"error: alignd vllm sets these itself: {', '.join(refused)}", file=sys.stderr)
        return 2
    if args.tensor_parallel_size < 1:
        print("error: --tensor-parallel-size must be at least 1", file=sys.stderr)
        return 2
    settings = get_settings()
    if args.base_model:
        try:
            location = resolve_model_name(args.base_model, settings.resolved_model_root).location
        except ModelNameError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        server = VllmServer(model_location=location, served_name=args.base_model, lora=True)
    else:
        try:
            with session_scope() as session:
                served = ensure_registered(session, name=args.model, tenant_id=None)
        except AlignError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        if served.is_adapter:
            print(f"{args.model} is a LoRA adapter: start vLLM for its base ({served.base_model}) instead",
                  file=sys.stderr)
            return 2
        server = VllmServer(model_location=served.model_path, served_name=args.model, lora=False)
    template = server.fallback_chat_template(settings.home / "vllm" / "templates")
    argv = server.command(settings, host=args.host, port=args.port, vllm=args.vllm, chat_template=template,
                          extra=["--tensor-parallel-size", str(args.tensor_parallel_size), *extra])
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    if shutil.which(argv[0]) is None:
        print(f"error: {argv[0]} not found: vLLM is installed in the worker image (the `gpu` extra)",
              file=sys.stderr)
        return 2
    os.execvpe(argv[0], argv, {**os.environ, **environment()})


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
    """API, a GPU-queue worker, a default-queue worker with the scheduler, the embedded model server
    and a rerank worker (best-of-N), until interrupted."""
    from app.db.migrate import upgrade

    upgrade()
    processes = [
        _spawn(["api", "--host", args.host, "--port", str(args.port)]),
        _spawn(["worker", "--queues", GPU_WORKER_QUEUES]),
        _spawn(["worker", "--queues", DEFAULT_WORKER_QUEUES, "--beat"]),
        _spawn(["model-server"]),
        _spawn(["worker", "--queues", RERANK_WORKER_QUEUES]),
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
