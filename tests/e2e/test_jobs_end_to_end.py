"""Whole jobs through the real API (uvicorn), Celery workers (separate processes), Postgres and
Redis, on the tiny models: learning, PairRM, SIGKILL-and-resume, cancel, bad models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from workers.tiny_models import synthetic_prompts, tiny_job_settings

pytestmark = pytest.mark.slow

FAST = tiny_job_settings()


def prompts(n: int, seed: int = 0) -> list[str]:
    return [p[-1]["content"] for p in synthetic_prompts(n, seed=seed)]


def job_body(prompt_set: str, reward: dict, rounds: int = 3, **extra) -> dict:
    return {"base_model": "tiny-mistral", "prompt_set": prompt_set, "reward_model": reward, "rounds": rounds,
            **FAST, **extra}


def assert_learned(client, job: dict) -> list[dict]:
    assert job["status"] == "succeeded", job
    rounds = client.rounds(job["id"])
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["status"] == "succeeded" for r in rounds)
    final = rounds[-1]["metrics"]
    # Held-out reward of the round-3 policy against the untouched base, both sampled on the same
    # eval prompts: a no-op training would leave the two equal up to sampling noise.
    assert final["eval_mean_reward"] > final["eval_base_mean_reward"] + 0.05 * max(
        1.0, abs(final["eval_base_mean_reward"])), final
    assert final["eval_win_rate"] > 0.6, final
    for key in ("eval_lc_win_rate", "eval_mean_length", "pairs_kept"):
        assert key in final, sorted(final)
    return rounds


def test_three_round_dpo_job_with_a_scalar_reward_model(client):
    prompt_set = client.upload(prompts(96))
    job = client.create_job(job_body(prompt_set["id"], {"type": "scalar", "model": "tiny-rm"},
                                     suffix="scalar"))
    job = client.wait(job["id"])
    assert_learned(client, job)
    assert job["fine_tuned_model"].startswith("ft:tiny-mistral:e2e:scalar:")
    assert job["progress"]["fraction"] == 1.0 and job["finished_at"]
    types = [e["type"] for e in client.events(job["id"])]
    assert types[0] == "job.created" and "job.queued" in types and types[-1] == "job.succeeded"
    assert types.count("round.completed") == 3


def test_three_round_dpo_job_with_pairrm(client):
    prompt_set = client.upload(prompts(96, seed=1))
    job = client.create_job(job_body(prompt_set["id"], {"type": "pairrm", "model": "tiny-pairrm"}))
    assert_learned(client, client.wait(job["id"]))


def test_cancel_mid_round(client):
    prompt_set = client.upload(prompts(48, seed=2))
    body = job_body(prompt_set["id"], {"type": "scalar", "model": "tiny-rm"})
    body["training"] = {**body["training"], "epochs": 30}  # a long train stage to cancel inside
    job = client.create_job(body)
    client.wait(job["id"], until=lambda j: j["progress"]["phase"] == "train", timeout=300)
    response = client.call("POST", f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "running"
    started = time.monotonic()
    job = client.wait(job["id"], timeout=120)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - started < 60
    rounds = client.rounds(job["id"])
    assert rounds[0]["status"] == "cancelled" and job["fine_tuned_model"] is None


def test_sigkill_mid_round_resumes_and_finishes(client, stack):
    prompt_set = client.upload(prompts(96, seed=3))
    job = client.create_job(job_body(prompt_set["id"], {"type": "scalar", "model": "tiny-rm"}))
    # Kill the GPU worker in the middle of round 2's generation, as the OOM killer would.
    client.wait(job["id"], until=lambda j: j["current_round"] == 2 and j["progress"]["phase"] in (
        "generate", "score", "pair", "train"), timeout=300)
    stack.kill("gpu-worker")
    killed_at = client.job(job["id"])
    assert killed_at["status"] == "running"
    stack.start_gpu_worker()
    job = client.wait(job["id"])
    rounds = assert_learned(client, job)
    types = [e["type"] for e in client.events(job["id"])]
    assert "job.requeued" in types and "round.resumed" in types
    assert all(r["metrics"]["round"] == r["round"] for r in rounds)


def test_sigterm_drains_the_round_back_to_the_queue(client, stack):
    heartbeat = Path(stack.env["ALIGND_HOME"]) / "worker-heartbeat"
    prompt_set = client.upload(prompts(96, seed=5))
    body = job_body(prompt_set["id"], {"type": "scalar", "model": "tiny-rm"}, rounds=1)
    body["training"] = {**body["training"], "epochs": 30}  # a train stage far longer than the drain
    job = client.create_job(body)
    client.wait(job["id"], until=lambda j: j["progress"]["phase"] == "train", timeout=300)
    assert time.time() - heartbeat.stat().st_mtime < 10  # the job heartbeat keeps the probe file fresh
    assert stack.terminate("gpu-worker") < 30  # warm shutdown, not the whole training stage
    job = client.job(job["id"])
    assert job["status"] == "running"
    types = [e["type"] for e in client.events(job["id"])]
    assert "round.released" in types and "job.failed" not in types
    stack.start_gpu_worker()
    # The next worker picks the round up again (the SIGKILL test shows a resumed job finishing;
    # here the long training stage would only cost time, so the job is cancelled once resumed).
    client.wait(job["id"], until=lambda j: any(e["type"] == "round.resumed" for e in client.events(j["id"])),
                timeout=120)
    client.wait(job["id"], until=lambda j: j["progress"]["phase"] == "train", timeout=120)
    events = client.events(job["id"])
    resumed_at = next(i for i, e in enumerate(events) if e["type"] == "round.resumed")
    skipped = {e["data"]["stage"] for e in events[resumed_at:] if e["type"] == "round.stage_skipped"}
    assert {"generate", "score", "pair"} <= skipped  # finished stages are not redone
    client.call("POST", f"/v1/jobs/{job['id']}/cancel")
    assert client.wait(job["id"], timeout=120)["status"] == "cancelled"


@pytest.mark.parametrize(("reward", "base", "code"), [
    ({"type": "scalar", "model": "tiny-rm"}, "no-such-model", "model_not_found"),
    ({"type": "scalar", "model": "tiny-mistral"}, "tiny-mistral", "reward_model_wrong_kind"),
    ({"type": "pairrm", "model": "tiny-rm"}, "tiny-mistral", "reward_model_wrong_kind"),
])
def test_bad_models_fail_the_job_clearly_and_the_worker_carries_on(client, reward, base, code):
    prompt_set = client.upload(prompts(24, seed=4))
    job = client.create_job({**job_body(prompt_set["id"], reward), "base_model": base})
    job = client.wait(job["id"], timeout=300)
    assert job["status"] == "failed" and job["error"]["code"] == code, job
    assert job["error"]["message"]
