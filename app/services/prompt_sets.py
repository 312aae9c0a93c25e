"""Prompt sets: parsed and validated at upload, stored with the tenant, never lost."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import Conflict, NotFound, UnprocessableRequest
from app.core.security import new_id
from app.db.base import utcnow
from app.db.models import Job, PromptSet, Tenant
from app.schemas.jobs import TERMINAL_STATUSES
from app.schemas.prompt_sets import PromptSetRead
from app.services.prompt_parsing import parse_prompt_file

MAX_NAME = 200


def to_read(prompt_set: PromptSet) -> PromptSetRead:
    return PromptSetRead(id=prompt_set.id, name=prompt_set.name, format=prompt_set.format,
                         num_prompts=prompt_set.num_prompts, sha256=prompt_set.sha256,
                         created_at=prompt_set.created_at)


def create_prompt_set(session: Session, *, tenant: Tenant, data: bytes, filename: str | None,
                      content_type: str | None, name: str | None) -> PromptSet:
    if name is not None and (len(name) > MAX_NAME or "\x00" in name or not name.strip()):
        raise UnprocessableRequest(f"name must be 1-{MAX_NAME} characters without NUL", param="name")
    fmt, prompts = parse_prompt_file(data, filename=filename, content_type=content_type)
    if len(prompts) > get_settings().max_prompts:
        raise UnprocessableRequest(f"at most {get_settings().max_prompts} prompts per set", param="file")
    default_name = (filename or "prompts").replace("\x00", "")[:MAX_NAME] or "prompts"
    prompt_set = PromptSet(id=new_id("ps"), tenant_id=tenant.id, name=name or default_name, format=fmt,
                           num_prompts=len(prompts), sha256=hashlib.sha256(data).hexdigest(), prompts=prompts)
    session.add(prompt_set)
    session.flush()
    return prompt_set


def get_prompt_set(session: Session, *, tenant: Tenant, prompt_set_id: str) -> PromptSet:
    prompt_set = session.scalar(select(PromptSet).where(
        PromptSet.id == prompt_set_id, PromptSet.tenant_id == tenant.id, PromptSet.deleted_at.is_(None)))
    if prompt_set is None:
        raise NotFound(f"no prompt set {prompt_set_id!r}", param="prompt_set_id")
    return prompt_set


def list_prompt_sets(session: Session, *, tenant: Tenant) -> list[PromptSet]:
    return list(session.scalars(select(PromptSet).where(
        PromptSet.tenant_id == tenant.id, PromptSet.deleted_at.is_(None)).order_by(PromptSet.created_at.desc())))


def delete_prompt_set(session: Session, *, tenant: Tenant, prompt_set_id: str) -> None:
    prompt_set = get_prompt_set(session, tenant=tenant, prompt_set_id=prompt_set_id)
    in_use = session.scalar(select(Job.id).where(
        Job.prompt_set_id == prompt_set.id, Job.status.not_in(TERMINAL_STATUSES)).limit(1))
    if in_use is not None:
        raise Conflict(f"prompt set is used by job {in_use}, which has not finished", code="prompt_set_in_use")
    # Finished jobs keep naming the set, so the row stays; its prompts go.
    prompt_set.deleted_at = utcnow()
    prompt_set.prompts = None
