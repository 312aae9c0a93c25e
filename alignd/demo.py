"""`make demo`: a whole alignment job end to end on the embedded default, on a CPU, in minutes.

Builds the tiny models, starts `alignd up` (SQLite, filesystem broker, API and workers as separate
processes), creates an API key, uploads a prompt set, runs a 3-round DPO job through the HTTP API
and prints the per-round table, then queries the aligned model (the Hugging Face `[INST]` endpoint
and the `openai` client, best-of-N included) and shuts everything down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from alignd.client_commands import format_rounds_table
from alignd.processes import stop_process_group

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / ".demo"
TERMINAL = {"succeeded", "failed", "cancelled"}



def demo_job() -> dict:
    from workers.tiny_models import tiny_job_settings

    return {"base_model": "tiny-mistral", "reward_model": {"type": "scalar", "model": "tiny-rm"}, "rounds": 3,
            **tiny_job_settings(), "suffix": "demo"}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models() -> Path:
    from workers.tiny_models import build_tiny_models

    models = DEMO_DIR / "models"
    if not (models / "TINY_MODELS.json").exists():
        say("building the tiny models (Mistral-architecture policy, scalar reward model, PairRM)")
        build_tiny_models(models)
    return models


def cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "alignd.cli", *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("alignd up exited early; see .demo/alignd.log")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("alignd did not become ready; see .demo/alignd.log")


def run_job(api: httpx.Client) -> dict:
    from workers.tiny_models import synthetic_prompts

    prompts = "\n".join(json.dumps({"prompt": p[-1]["content"]}) for p in synthetic_prompts(96, seed=0))
    say("uploading a prompt set of 96 prompts")
    prompt_set = api.post("/v1/prompt-sets", files={"file": ("prompts.jsonl", prompts.encode())},
                          data={"name": "demo-prompts"}).raise_for_status().json()
    print(f"{prompt_set['id']}: {prompt_set['num_prompts']} prompts, sha256 {prompt_set['sha256'][:12]}...")
    say("creating a 3-round iterative DPO job (scalar reward model)")
    job = api.post("/v1/jobs", json={**demo_job(), "prompt_set": prompt_set["id"]}).raise_for_status().json()
    print(f"{job['id']}: {job['status']}")
    say("following the job's events")
    with api.stream("GET", f"/v1/jobs/{job['id']}/events", params={"stream": "true"},
                    timeout=httpx.Timeout(30, read=None)) as stream:
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "job.event":
                event = json.loads(line[6:])
                if event["type"].startswith(("job.", "round.started", "round.completed")):
                    print(f"  {event['created_at'][11:19]}  {event['type']:<18} {event['message']}", flush=True)
            elif kind == "end":
                break
    return api.get(f"/v1/jobs/{job['id']}").raise_for_status().json()


# -- Serving: the aligned model answers at once, Hugging Face style and through the openai client --

QUESTION = "what the small cat sees ?"  # the tiny model's synthetic English


def _until_served(send, timeout: float = 120) -> httpx.Response:  # noqa: ANN001 — a zero-argument request
    """The first request may reach the model server while `alignd up` is still starting it (503)."""
    deadline = time.monotonic() + timeout
    while True:
        response = send()
        if response.status_code != 503 or time.monotonic() > deadline:
            return response.raise_for_status()
        time.sleep(1)


def query_aligned_model(url: str, key: str, model: str) -> None:
    import openai

    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    inputs = f"[INST] {QUESTION} [/INST]"
    say("querying the aligned model: POST /v1/models/{model}/generate with [INST] text (one BOS, no template)")
    answer = _until_served(lambda: api.post(f"/v1/models/{model}/generate", json={
        "inputs": inputs, "parameters": {"max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9}})).json()
    print(f"  {inputs!r} -> {answer[0]['generated_text']!r}")

    say("the same model through the official openai client (base_url = alignd)")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    print(f"  models: {[m.id for m in client.models.list().data]}")
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
    print(f"  chat.completions: {chat.choices[0].message.content!r}")
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True)
    print(f"  streamed: {''.join(c.choices[0].delta.content or '' for c in streamed if c.choices)!r}")
    best = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                          extra_body={"best_of": 4, "rerank": True})
    rerank = best.model_extra["rerank"]
    print("  best-of-4, reranked by the job's reward model on the rerank worker:")
    for i, (text, score) in enumerate(zip(rerank["candidates"], rerank["scores"], strict=True)):
        print(f"    {'->' if i == rerank['chosen'][0] else '  '} {score:+.3f}  {text!r}")


def main() -> int:
    models = build_models()
    home = DEMO_DIR / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")},
           "ALIGND_HOME": str(home), "ALIGND_MODEL_ROOT": str(models), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "ALIGND_MODEL_SERVER_URL": f"http://127.0.0.1:{free_port()}"}
    url = f"http://127.0.0.1:{port}"
    say(f"starting `alignd up` on {url} (SQLite, filesystem broker, API + workers); log: .demo/alignd.log")
    log = (DEMO_DIR / "alignd.log").open("wb")
    up = subprocess.Popen([sys.executable, "-m", "alignd.cli", "up", "--port", str(port)], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, up)
        key = cli(env, "keys", "create", "--tenant", "demo").strip().splitlines()[-1]
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        job = run_job(api)
        rounds = api.get(f"/v1/jobs/{job['id']}/rounds").raise_for_status().json()["data"]
        say(f"job {job['status']}: per-round held-out evaluation against the base model")
        print(format_rounds_table(rounds))
        if job["status"] != "succeeded":
            print(f"error: {job['error']}")
            return 1
        print(f"\naligned model: {job['fine_tuned_model']}")
        query_aligned_model(url, key, job["fine_tuned_model"])
        return 0
    finally:
        say("shutting down")
        stop_process_group(up, timeout=60)
        print("stopped.")


if __name__ == "__main__":
    sys.exit(main())
