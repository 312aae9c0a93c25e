"""Serving through the alignd API versus calling the model backend directly: same model, same load,
same run.

    .venv/bin/python bench/serve.py [--concurrency 4] [--seconds 8] [--rounds 3] [--max-tokens 32]
    .venv/bin/python bench/serve.py --vllm-url http://127.0.0.1:8000 --base-model org/name --adapters 8

Default (CPU): the tiny Mistral with a LoRA adapter, registered as a succeeded job's model, served
by `alignd model-server`; `alignd api` in front of it (SQLite, the embedded default). Each client
sends `/v1/completions` requests back to back (fixed prompt, `ignore_eos` so every answer has
exactly `--max-tokens` tokens); direct and gateway phases alternate (`--rounds` each) so drift hits
both alike. With `--vllm-url` (a GPU box, vLLM started by `alignd vllm --base-model ...`), the
backend is vLLM with `--adapters` LoRA adapters loaded at run time and requests spread over them.

Prints completion tokens/s and p50/p99 latency per target; last line `ratio: X.XX` = gateway
tokens/s over direct (aim: at least 0.9).
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
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_adapter(base_dir: Path, out: Path, *, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj; safetensors) with random non-zero weights, written from
    the base's config.json alone, so no base weights are loaded (a 7B base stays on disk)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out_features in (("q_proj", heads * head_dim), ("v_proj", kv_heads * head_dim)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) / hidden ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / rank ** 0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir), "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True}))
    return out


def register_models(base_model: str, base_dir: Path, artifacts: Path, count: int) -> tuple[str, list[str]]:
    """A tenant, its key, and `count` succeeded one-round jobs whose model is a LoRA adapter."""
    from app.core.security import new_id
    from app.db.base import utcnow
    from app.db.models import Job, JobRound, PromptSet
    from app.db.session import session_scope
    from app.schemas.job_spec import JobSpec
    from app.services.tenants import create_api_key

    names = []
    with session_scope() as session:
        issued = create_api_key(session, tenant_name="bench")
        prompt_set = PromptSet(id=new_id("ps"), tenant_id=issued.tenant.id, name="bench", format="jsonl",
                               num_prompts=1, sha256="0" * 64, prompts=[[{"role": "user", "content": "hi"}]])
        session.add(prompt_set)
        session.flush()
        spec = JobSpec(base_model=base_model, prompt_set=prompt_set.id, rounds=1,
                       reward_model={"type": "scalar", "model": "tiny-rm"}).model_dump(mode="json")
        for i in range(count):
            job_id = new_id("job")
            name = f"ft:{base_model.rsplit('/', 1)[-1]}:bench:a{i}:{job_id.removeprefix('job_')}"
            adapter = write_adapter(base_dir, artifacts / job_id / "round-1" / "model", rank=8, seed=i)
            session.add(Job(id=job_id, tenant_id=issued.tenant.id, prompt_set_id=prompt_set.id, status="succeeded",
                            base_model=base_model, spec=spec, rounds=1, current_round=1, fine_tuned_model=name,
                            started_at=utcnow(), finished_at=utcnow(), progress_fraction=1.0))
            session.flush()
            session.add(JobRound(job_id=job_id, round=1, status="succeeded", model_path=str(adapter),
                                 finished_at=utcnow()))
            names.append(name)
        key = issued.key
    return key, names


def start(argv: list[str], env: dict[str, str], health: str, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{argv[3]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(health, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{health} did not answer: {log.read_text()[-2000:]}")


async def load(url: str, headers: dict[str, str], models: list[str], *, concurrency: int, seconds: float,
               max_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = errors = 0
    stop_at = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal tokens, errors
        i = index
        while time.perf_counter() < stop_at:
            body = {"model": models[i % len(models)], "prompt": "[INST] what the small cat sees ? [/INST]",
                    "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
            i += concurrency
            start_ = time.perf_counter()
            response = await client.post(url, json=body, headers=headers)
            latencies.append(time.perf_counter() - start_)
            if response.status_code != 200:
                errors += 1
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"seconds": elapsed, "tokens": tokens, "requests": len(latencies), "errors": errors,
            "latencies": latencies}


def summary(phases: list[dict[str, float]]) -> dict[str, float]:
    latencies = sorted(x for p in phases for x in p["latencies"])
    seconds = sum(p["seconds"] for p in phases)
    return {"tokens_per_s": sum(p["tokens"] for p in phases) / seconds, "requests": len(latencies),
            "errors": sum(p["errors"] for p in phases), "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument("--rounds", type=int, default=3, help="direct/gateway phase pairs")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", type=Path, help="a model root with the tiny models (default: build them)")
    parser.add_argument("--vllm-url", help="benchmark against this vLLM server instead of the embedded one")
    parser.add_argument("--base-model", default="tiny-mistral", help="with --vllm-url: the base it serves")
    parser.add_argument("--adapters", type=int, default=None, help="LoRA adapters (default: 1; 8 with vLLM)")
    args = parser.parse_args()
    adapters = args.adapters or (8 if args.vllm_url else 1)

    home = Path(tempfile.mkdtemp(prefix="alignd-bench-serve-"))
    model_root = args.models
    if model_root is None:
        from workers.tiny_models import build_tiny_models

        model_root = home / "models"
        build_tiny_models(model_root)
    backend_port, api_port = free_port(), free_port()
    backend = args.vllm_url.rstrip("/") if args.vllm_url else f"http://127.0.0.1:{backend_port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")}, "ALIGND_HOME": str(home),
           "ALIGND_MODEL_ROOT": str(model_root.resolve()), "ALIGND_ARTIFACT_ROOT": str(home / "artifacts"),
           "ALIGND_MODEL_SERVER_URL": backend, "TOKENIZERS_PARALLELISM": "false"}
    if args.vllm_url:
        env["ALIGND_VLLM_BASE_URLS"] = json.dumps({args.base_model: backend})
    os.environ.update(env)
    subprocess.run([sys.executable, "-m", "alignd.cli", "db", "upgrade"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    from app.core.model_names import resolve_model_name

    base_dir = Path(resolve_model_name(args.base_model, model_root.resolve()).location)
    key, names = register_models(args.base_model, base_dir, home / "artifacts", adapters)
    procs = []
    try:
        if not args.vllm_url:
            procs.append(start([sys.executable, "-m", "alignd.cli", "model-server", "--port", str(backend_port)], env,
                               f"{backend}/healthz", home / "model-server.log"))
        procs.append(start([sys.executable, "-m", "alignd.cli", "api", "--port", str(api_port)], env,
                           f"http://127.0.0.1:{api_port}/healthz", home / "api.log"))
        gateway = f"http://127.0.0.1:{api_port}/v1/completions"
        direct = f"{backend}/v1/completions"
        auth = {"Authorization": f"Bearer {key}"}
        for name in names:  # registers each model, loads it (vLLM: the adapter, lazily) and warms up
            response = httpx.post(gateway, headers=auth, timeout=600, json={
                "model": name, "prompt": "hi", "max_tokens": 2})
            response.raise_for_status()

        def phase(url: str, headers: dict[str, str]) -> dict[str, float]:
            return asyncio.run(load(url, headers, names, concurrency=args.concurrency, seconds=args.seconds,
                                    max_tokens=args.max_tokens))

        phase(direct, {})  # warm-up: both paths' connection pools and the backend's caches
        phase(gateway, auth)
        results: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        for _ in range(args.rounds):
            results["direct"].append(phase(direct, {}))
            results["gateway"].append(phase(gateway, auth))
        direct_s, gateway_s = summary(results["direct"]), summary(results["gateway"])
        kind = "vLLM" if args.vllm_url else "alignd model-server (transformers, CPU)"
        print(f"backend: {kind}; {adapters} adapter(s) on {args.base_model}; concurrency {args.concurrency}; "
              f"{args.max_tokens} tokens per answer; {args.rounds} x {args.seconds:.0f}s per target, alternating; "
              f"{os.cpu_count()} CPU cores shared by backend, API and load generator")
        print(f"{'target':<34}{'tokens/s':>10}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
        for label, s in (("direct (backend /v1/completions)", direct_s), ("gateway (alignd /v1/completions)",
                                                                          gateway_s)):
            print(f"{label:<34}{s['tokens_per_s']:>10.1f}{s['requests']:>10}{s['p50_ms']:>10.1f}"
                  f"{s['p99_ms']:>10.1f}{s['errors']:>8}")
        print(f"ratio: {gateway_s['tokens_per_s'] / direct_s['tokens_per_s']:.2f}")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
