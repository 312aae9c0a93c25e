"""Validation, claiming, heartbeats and requeueing against real Postgres and Redis."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import redis

from app.core.config import get_settings
from app.db.base import utcnow
from app.db.models import Job, JobRound
from app.db.session import session_scope
from tests.app.helpers import create_job, upload


def _queued(name: str) -> list[dict]:
    client = redis.Redis.from_url(get_settings().broker_url)
    return [json.loads(m) for m in client.lrange(name, 0, -1)]


def _fake_models() -> None:
    for name in ("tiny-mistral", "tiny-rm"):
        (Path(get_settings().resolved_model_root) / name).mkdir(parents=True, exist_ok=True)
        (Path(get_settings().resolved_model_root) / name / "config.json").write_text("{}")


def _job(api, **fields) -> str:
    return create_job(api, upload(api).json()["id"], **fields).json()["id"]


def _status(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def test_validation_queues_the_job_on_the_gpu_queue(api):
    from workers.tasks.validate import validate_job

    _fake_models()
    job_id = _job(api)
    validate_job(job_id)
    assert _status(job_id).status == "queued"
    assert any(m["headers"]["task"] == "alignd.run_round" and job_id in m["headers"]["argsrepr"]
               for m in _queued("gpu"))
    validate_job(job_id)  # a second delivery changes nothing
    assert sum(job_id in m["headers"]["argsrepr"] for m in _queued("gpu")) == 1


def test_validation_fails_a_job_whose_model_is_missing(api):
    from workers.tasks.validate import validate_job

    job_id = _job(api)
    validate_job(job_id)
    job = _status(job_id)
    assert job.status == "failed" and job.error_code == "model_not_found"
    assert "tiny-mistral" in job.error_message


def test_validation_fails_when_too_few_prompts_for_the_rounds(api):
    from workers.tasks.validate import validate_job

    _fake_models()
    prompt_set = upload(api, b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"}\n').json()
    job_id = create_job(api, prompt_set["id"], rounds=3).json()["id"]
    validate_job(job_id)
    assert _status(job_id).error_code == "too_few_prompts"


def test_gpu_queue_routing_by_model_size(api, monkeypatch):
    from workers.routing import choose_gpu_queue, estimate_billions_of_parameters

    root = get_settings().resolved_model_root
    (root / "big").mkdir(parents=True)
    (root / "big" / "config.json").write_text(json.dumps(
        {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 32000,
         "num_attention_heads": 64, "num_key_value_heads": 8}))
    assert 60 < estimate_billions_of_parameters("big", root) < 75
    assert estimate_billions_of_parameters("mistralai/Mistral-7B-Instruct-v0.2", root) == 7.0
    from app.schemas.job_spec import JobSpec

    routed = get_settings().model_copy(update={"gpu_queue_routes": [(30.0, "gpu-h200"), (0.0, "gpu-a100")]})
    assert choose_gpu_queue(JobSpec(base_model="big", prompt_set="p"), routed) == "gpu-h200"
    assert choose_gpu_queue(JobSpec(base_model="org/m-7B", prompt_set="p"), routed) == "gpu-a100"
    full = JobSpec(base_model="org/m-13B", prompt_set="p", training={"method": "full"})
    assert choose_gpu_queue(full, routed) == "gpu-h200"
    assert choose_gpu_queue(JobSpec(base_model="big", prompt_set="p"), get_settings()) == "gpu"


def _make_running(job_id: str, *, worker: str | None, heartbeat_age_s: float, attempts: int = 1) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.current_round, job.worker_id, job.attempts = "running", 1, worker, attempts
        job.heartbeat_at = utcnow() - timedelta(seconds=heartbeat_age_s)
        job.started_at = utcnow()
        session.add(JobRound(job_id=job_id, round=1, status="running"))


def test_stale_running_job_is_requeued(api):
    from workers.tasks.housekeeping import requeue_stale_jobs

    stale, fresh = _job(api), _job(api)
    _make_running(stale, worker="dead-worker", heartbeat_age_s=10_000)
    _make_running(fresh, worker="live-worker", heartbeat_age_s=1)
    assert requeue_stale_jobs() == 1
    assert [m for m in _queued("gpu") if stale in m["headers"]["argsrepr"]]
    assert not [m for m in _queued("gpu") if fresh in m["headers"]["argsrepr"]]
    assert _status(stale).worker_id is None


def test_duplicate_delivery_leaves_a_live_worker_alone(api):
    from workers.job_state import claim_round

    job_id = _job(api)
    _make_running(job_id, worker="someone-else", heartbeat_age_s=1)
    assert claim_round(job_id) is None
    assert _status(job_id).worker_id == "someone-else"


def test_claim_counts_attempts_and_gives_up(api):
    from workers.job_state import claim_round

    job_id = _job(api)
    _make_running(job_id, worker=None, heartbeat_age_s=10_000, attempts=get_settings().max_attempts)
    assert claim_round(job_id) is None
    job = _status(job_id)
    assert job.status == "failed" and job.error_code == "worker_lost"
    with session_scope() as session:
        assert session.get(JobRound, (job_id, 1)).status == "failed"


def test_claim_takes_over_a_dead_workers_round(api):
    from workers.job_state import WORKER_ID, claim_round

    job_id = _job(api)
    _make_running(job_id, worker="dead-worker", heartbeat_age_s=10_000)
    claim = claim_round(job_id)
    assert claim is not None and claim.round == 1 and len(claim.prompts) == 12
    job = _status(job_id)
    assert job.worker_id == WORKER_ID and job.attempts == 2


def test_cancel_requested_before_claim_ends_the_job(api):
    from workers.job_state import claim_round

    job_id = _job(api)
    _make_running(job_id, worker=None, heartbeat_age_s=10_000)
    with session_scope() as session:
        session.get(Job, job_id).cancel_requested = True
    assert claim_round(job_id) is None
    assert _status(job_id).status == "cancelled"
