"""Which fine-tuned models a tenant can query, and where each one's weights live.

A model name is the job's `fine_tuned_model` (`ft:<base>:<tenant>:<suffix>:<job id>`). Its last
segment names the job, so a model that is still training can be told apart from one that never
existed: the first answers 409 with the job's status, the second 404 (as does another tenant's).

The first time a succeeded job's model is used, a `served_models` row is registered from the job
and its served round (the adapter or full model the worker wrote). The API and the embedded model
server both call `ensure_registered`, so whichever sees the model first registers it, once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import Conflict, NotFound
from app.db.models import Job, JobRound, ServedModel, Tenant

FINE_TUNED_PREFIX = "ft:"


@dataclass(frozen=True)
class ServedModelInfo:
    name: str
    tenant_id: str
    job_id: str
    base_model: str
    model_path: str
    is_adapter: bool
    created_at: datetime

    @classmethod
    def of(cls, row: ServedModel) -> ServedModelInfo:
        return cls(name=row.name, tenant_id=row.tenant_id, job_id=row.job_id, base_model=row.base_model,
                   model_path=row.model_path, is_adapter=row.is_adapter, created_at=row.created_at)


@dataclass(frozen=True)
class BackendRoute:
    """Where requests for a model go: `kind` is "vllm" or "embedded"."""

    kind: str
    url: str
    adapter_path: str | None = None  # a LoRA adapter vLLM must have loaded under the model's name


def route_for(model: ServedModelInfo, settings: Settings) -> BackendRoute:
    """vLLM when the model (a full fine-tune with its own server) or its base has a vLLM URL."""
    urls = settings.vllm_base_urls
    if model.is_adapter and model.base_model in urls:
        return BackendRoute("vllm", urls[model.base_model].rstrip("/"), adapter_path=model.model_path)
    if not model.is_adapter and model.name in urls:
        return BackendRoute("vllm", urls[model.name].rstrip("/"))
    return BackendRoute("embedded", settings.model_server_url.rstrip("/"))


def job_id_of(model_name: str) -> str | None:
    if not model_name.startswith(FINE_TUNED_PREFIX) or model_name.count(":") < 4:
        return None
    tail = model_name.rsplit(":", 1)[1]
    return f"job_{tail}" if tail.isalnum() else None


def _not_found(name: str) -> NotFound:
    return NotFound(f"The model {name!r} does not exist", param="model", code="model_not_found")


def _check_name(name: str) -> None:
    """No stored name holds a NUL (Postgres cannot even compare against one): answer 404 at once."""
    if "\x00" in name:
        raise _not_found(name)


def _check_job(job: Job | None, name: str) -> Job:
    """The job behind `name`, if it has produced exactly that model."""
    if job is None or (job.fine_tuned_model is not None and job.fine_tuned_model != name):
        raise _not_found(name)
    if job.status != "succeeded":
        raise Conflict(f"model {name!r} is not ready: job {job.id} is {job.status}", param="model",
                       code="model_not_ready", headers={"alignd-job-status": job.status})
    if job.fine_tuned_model is None:
        raise _not_found(name)
    return job


def served_round(session: Session, job: Job) -> JobRound | None:
    """The round whose model the job serves: the one marked `selected` in its metrics (the job's
    `selection` rule), else the last round that produced a model (early stopping may end a job
    before `rounds`)."""
    rounds = list(session.scalars(select(JobRound).where(
        JobRound.job_id == job.id, JobRound.status == "succeeded", JobRound.model_path.is_not(None))
        .order_by(JobRound.round)))
    selected = [r for r in rounds if (r.metrics or {}).get("selected")]
    return (selected or rounds or [None])[-1]


def register(session: Session, job: Job) -> ServedModel:
    """The served-model row of a succeeded job, created if missing (safe against a concurrent twin)."""
    existing = session.scalar(select(ServedModel).where(ServedModel.job_id == job.id))
    if existing is not None:
        return existing
    chosen = served_round(session, job)
    if chosen is None:
        raise Conflict(f"job {job.id} succeeded but recorded no model", param="model", code="model_missing")
    row = ServedModel(name=job.fine_tuned_model, tenant_id=job.tenant_id, job_id=job.id,
                      base_model=job.base_model, model_path=chosen.model_path,
                      # The pipeline's rule: LoRA training writes an adapter, full training a model.
                      is_adapter=(job.spec.get("training") or {}).get("method", "lora") == "lora")
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        row = session.scalar(select(ServedModel).where(ServedModel.job_id == job.id))
        if row is None:
            raise
    return row


def ensure_registered(session: Session, *, name: str, tenant_id: str | None) -> ServedModelInfo:
    """Look `name` up (within a tenant, or any tenant for the internal model server); register a
    succeeded job's model on first use. Commits a new registration."""
    _check_name(name)
    query = select(ServedModel).where(ServedModel.name == name)
    if tenant_id is not None:
        query = query.where(ServedModel.tenant_id == tenant_id)
    row = session.scalar(query)
    if row is not None:
        return ServedModelInfo.of(row)
    job_id = job_id_of(name)
    if job_id is None:
        raise _not_found(name)
    job_query = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        job_query = job_query.where(Job.tenant_id == tenant_id)
    job = _check_job(session.scalar(job_query), name)
    row = register(session, job)
    session.commit()
    return ServedModelInfo.of(row)


class _ModelCache:
    """(tenant, name) -> served model for a few seconds: rows never change once written, so the
    TTL only bounds memory and how long a deleted tenant's model stays reachable."""

    def __init__(self, ttl: float = 60.0, size: int = 4096) -> None:
        self.ttl, self.size = ttl, size
        self._entries: dict[tuple[str, str], tuple[float, ServedModelInfo]] = {}

    def get(self, tenant_id: str, name: str) -> ServedModelInfo | None:
        entry = self._entries.get((tenant_id, name))
        return entry[1] if entry is not None and entry[0] > time.monotonic() else None

    def put(self, model: ServedModelInfo) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[(model.tenant_id, model.name)] = (time.monotonic() + self.ttl, model)

    def clear(self) -> None:
        self._entries.clear()


MODEL_CACHE = _ModelCache()


async def lookup(sessions: async_sessionmaker[AsyncSession], *, tenant: Tenant,
                 name: str) -> ServedModelInfo | None:
    """The hot path: cache, then one read. None means "not registered yet" (the caller registers)."""
    cached = MODEL_CACHE.get(tenant.id, name)
    if cached is not None:
        return cached
    _check_name(name)
    async with sessions() as session:
        row = await session.scalar(select(ServedModel).where(ServedModel.name == name,
                                                             ServedModel.tenant_id == tenant.id))
        if row is None:
            return None
        info = ServedModelInfo.of(row)
    MODEL_CACHE.put(info)
    return info


def remember(model: ServedModelInfo) -> None:
    MODEL_CACHE.put(model)


def list_models(session: Session, *, tenant: Tenant) -> list[Job]:
    """The tenant's queryable models: every succeeded job with a fine-tuned model, newest first."""
    return list(session.scalars(select(Job).where(
        Job.tenant_id == tenant.id, Job.status == "succeeded", Job.fine_tuned_model.is_not(None))
        .order_by(Job.finished_at.desc(), Job.id.desc())))
