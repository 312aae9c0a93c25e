"""Job events: the user-visible log of what happened to a job."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import JobEvent


def add_event(session: Session, *, job_id: str, type: str, message: str, level: str = "info",
              data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, type=type, message=message, level=level, data=data or {})
    session.add(event)
    return event


def list_events(session: Session, *, job_id: str, after: int | None, limit: int) -> tuple[list[JobEvent], bool]:
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(JobEvent.id > after)
    rows = list(session.scalars(query.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
