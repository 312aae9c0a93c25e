"""Jobs as the API sees them: create, read, list, cancel; enqueue only after commit."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session

from app import queue
from app.core.config import get_settings
from app.core.endpoints import endpoint_allowed
from app.core.errors import Conflict, InvalidRequest, NotFound, UnprocessableRequest
from app.core.security import new_id
from app.db.fast_reads import job_reader
from app.db.models import Job, JobRound, PromptSet, Tenant
from app.schemas.job_spec import JobCreate, JobSpec
from app.schemas.jobs import TERMINAL_STATUSES, JobRead, JobRoundRead
from app.services.events import add_event
from app.services.job_lifecycle import after_commit_notify, finish_job


def job_spec(job: Job) -> JobSpec:
    return JobSpec.model_validate(job.spec)


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


_JOB_COLUMNS = [(prop.key, prop.columns[0].name) for prop in sa_inspect(Job).column_attrs]


def job_row(job: Job) -> dict[str, Any]:
    """An ORM job as the column-name mapping a Core query returns."""
    return {column: getattr(job, attribute) for attribute, column in _JOB_COLUMNS}


def document_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the API shows it, built straight from its columns (the spec was validated and
    normalised when stored); `JobRead` describes the same shape and the tests check it."""
    spec = row["spec"]
    return {
        "id": row["id"], "object": "alignment.job", "status": row["status"], "base_model": row["base_model"],
        "prompt_set": row["prompt_set_id"], "reward_model": spec["reward_model"], "algorithm": spec["algorithm"],
        "pairing": spec["pairing"], "generation": spec["generation"], "training": spec["training"],
        "rounds": row["rounds"], "samples_per_prompt": spec["samples_per_prompt"],
        "eval_fraction": spec["eval_fraction"], "reuse_prompts": spec["reuse_prompts"],
        "split_seed": spec["split_seed"], "selection": spec["selection"], "early_stopping": spec["early_stopping"],
        "length_growth_warning": spec["length_growth_warning"], "current_round": row["current_round"],
        "progress": {"phase": row["phase"], "fraction": round(row["progress_fraction"], 4)},
        "created_at": _timestamp(row["created_at"]), "started_at": _timestamp(row["started_at"]),
        "finished_at": _timestamp(row["finished_at"]),
        "error": {"code": row["error_code"], "message": row["error_message"] or ""} if row["error_code"] else None,
        "fine_tuned_model": row["fine_tuned_model"], "suffix": row["suffix"], "webhook_url": row["webhook_url"],
        "metadata": row["metadata"] or {},
    }


def job_document(job: Job) -> dict[str, Any]:
    return document_from_row(job_row(job))


def to_read(job: Job) -> JobRead:
    return JobRead.model_validate(job_document(job))


def create_job(session: Session, *, tenant: Tenant, body: JobCreate) -> Job:
    prompt_set = session.scalar(select(PromptSet).where(
        PromptSet.id == body.prompt_set, PromptSet.tenant_id == tenant.id, PromptSet.deleted_at.is_(None)))
    if prompt_set is None:
        raise InvalidRequest(f"no prompt set {body.prompt_set!r}", param="prompt_set", code="prompt_set_not_found")
    spec = body.spec()
    judge = spec.reward_model.judge
    if judge is not None and not endpoint_allowed(judge.endpoint, get_settings().judge_endpoint_allowlist):
        raise UnprocessableRequest(f"judge endpoint {judge.endpoint!r} is not in this service's allowlist",
                                   param="reward_model.judge.endpoint", code="judge_endpoint_not_allowed")
    settings = get_settings()
    if (spec.training.method == "lora" and spec.base_model in settings.vllm_base_urls
            and spec.training.lora.r > settings.vllm_max_lora_rank):
        raise UnprocessableRequest(f"training.lora.r {spec.training.lora.r} exceeds the rank vLLM serves for "
                                   f"{spec.base_model} ({settings.vllm_max_lora_rank})", param="training.lora.r",
                                   code="lora_rank_not_servable")
    job = Job(id=new_id("job"), tenant_id=tenant.id, prompt_set_id=prompt_set.id, status="validating",
              base_model=spec.base_model, spec=spec.model_dump(mode="json"), rounds=spec.rounds,
              suffix=body.suffix, webhook_url=body.webhook_url, job_metadata=body.metadata)
    session.add(job)
    session.flush()
    add_event(session, job_id=job.id, type="job.created", message="job created, validating inputs",
              data={"prompt_set": prompt_set.id, "num_prompts": prompt_set.num_prompts})
    return job


def enqueue_validation(job: Job) -> None:
    queue.send(queue.TASK_VALIDATE_JOB, [job.id])


def _found(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return job


def get_job(session: Session, *, tenant: Tenant, job_id: str) -> Job:
    return _found(session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id)), job_id)


async def get_job_document(*, tenant: Tenant, job_id: str) -> dict[str, Any]:
    """The polling hot path: one prepared query, no ORM identity map, no second validation."""
    row = await job_reader().job_row(job_id=job_id, tenant_id=tenant.id)
    if row is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return document_from_row(row)


def list_jobs(session: Session, *, tenant: Tenant, limit: int, after: str | None,
              status: str | None) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status)
    if after:
        cursor = get_job(session, tenant=tenant, job_id=after)
        query = query.where(or_(Job.created_at < cursor.created_at,
                                and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_job(session: Session, *, tenant: Tenant, job_id: str) -> Job:
    job = get_job(session, tenant=tenant, job_id=job_id)
    if job.status == "cancelled":
        return job
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job already {job.status}", code="job_not_cancellable")
    if job.status in ("validating", "queued"):
        finish_job(session, job, "cancelled", message="job cancelled before it started")
    elif not job.cancel_requested:
        job.cancel_requested = True
        add_event(session, job_id=job.id, type="job.cancel_requested", level="warning",
                  message="cancellation requested; the job stops at the next safe point")
    return job


def notify(job: Job) -> None:
    after_commit_notify(job)


def list_rounds(session: Session, *, job: Job) -> list[JobRoundRead]:
    rows = session.scalars(select(JobRound).where(JobRound.job_id == job.id).order_by(JobRound.round))
    return [JobRoundRead(round=r.round, status=r.status, metrics=r.metrics or {}, started_at=r.started_at,
                         finished_at=r.finished_at) for r in rows]


def summary(job: Job) -> dict[str, Any]:
    return job_document(job)
