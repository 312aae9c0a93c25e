"""validating -> queued: check what needs I/O before a GPU is spent on the job."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from app import queue
from app.core.config import get_settings
from app.core.endpoints import endpoint_allowed
from app.core.model_names import ModelNameError, resolve_model_name
from app.db.base import utcnow
from app.db.models import Job, PromptSet
from app.db.session import session_scope
from app.schemas.job_spec import RewardModelConfig
from app.services.events import add_event
from app.services.job_lifecycle import after_commit_notify, finish_job
from app.services.jobs import job_spec
from workers.celery_app import celery_app
from workers.routing import choose_gpu_queue

log = logging.getLogger("alignd.worker")


class JobInvalid(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _check_local_model(name: str, what: str) -> None:
    try:
        resolved = resolve_model_name(name, get_settings().resolved_model_root)
    except ModelNameError as exc:
        raise JobInvalid("model_not_found", f"{what}: {exc}") from exc
    if resolved.is_local and not (Path(resolved.location) / "config.json").is_file():
        raise JobInvalid("model_not_loadable", f"{what}: {name!r} has no config.json")


def _check_reward(reward: RewardModelConfig) -> None:
    """Models that must exist here, and a judge endpoint the service allows (re-checked by the worker)."""
    if reward.type in ("pairrm", "scalar", "implicit") and reward.model is not None:
        _check_local_model(reward.model, "reward_model.model")
    if reward.reference_model is not None:
        _check_local_model(reward.reference_model, "reward_model.reference_model")
    if reward.judge is not None and not endpoint_allowed(reward.judge.endpoint,
                                                         get_settings().judge_endpoint_allowlist):
        raise JobInvalid("judge_endpoint_not_allowed", f"reward_model.judge.endpoint {reward.judge.endpoint!r} "
                         "is not in this service's judge endpoint allowlist")


def check_job(job: Job, prompt_set: PromptSet | None) -> None:
    if prompt_set is None or prompt_set.deleted_at is not None or not prompt_set.prompts:
        raise JobInvalid("prompt_set_not_found", "the job's prompt set no longer exists")
    spec = job_spec(job)
    _check_local_model(spec.base_model, "base_model")
    _check_reward(spec.reward_model)
    eval_count = max(1, round(prompt_set.num_prompts * spec.eval_fraction))
    train_count = prompt_set.num_prompts - eval_count
    needed = 1 if spec.reuse_prompts else spec.rounds
    if train_count < needed:
        raise JobInvalid("too_few_prompts", f"{prompt_set.num_prompts} prompts leave {train_count} for "
                         f"training after the eval split; {needed} needed (one per round)")


@celery_app.task(name=queue.TASK_VALIDATE_JOB)
def validate_job(job_id: str) -> None:
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status != "validating":
            return
        prompt_set = session.get(PromptSet, job.prompt_set_id)
        try:
            check_job(job, prompt_set)
        except JobInvalid as exc:
            finish_job(session, job, "failed", error_code=exc.code, error_message=exc.message)
            target = None
        else:
            job.status = "queued"
            job.queue = choose_gpu_queue(job_spec(job), get_settings())
            job.heartbeat_at = utcnow()  # when it was last enqueued; housekeeping reads it
            add_event(session, job_id=job.id, type="job.queued", message=f"job queued on {job.queue}",
                      data={"queue": job.queue})
            target = job.queue
    if target is None:
        after_commit_notify(job)
    else:
        queue.send(queue.TASK_RUN_ROUND, [job_id], queue=target)
