"""Periodic housekeeping (Celery beat, default queue): requeue orphaned jobs, purge old keys."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select

from app import queue
from app.core.config import get_settings
from app.db.base import utcnow
from app.db.models import Job
from app.db.session import session_scope
from app.services import idempotency
from app.services.events import add_event
from workers.celery_app import celery_app

log = logging.getLogger("alignd.housekeeping")


def find_orphans() -> list[tuple[str, str, str]]:
    """Jobs whose message or worker was lost: (job id, task name, queue). Marks them requeued."""
    settings = get_settings()
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    long_wait = now - timedelta(seconds=settings.visibility_timeout_s)
    orphans = []
    with session_scope() as session:
        jobs = session.scalars(select(Job).where(or_(
            # A running job whose worker stopped heartbeating (killed, OOM, node lost).
            (Job.status == "running") & or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < stale),
            # A validation message lost (e.g. the API died between commit and enqueue).
            (Job.status == "validating") & (Job.created_at < stale),
            # A queued job nobody picked up for longer than the broker would keep it.
            (Job.status == "queued") & (Job.heartbeat_at < long_wait),
        )).with_for_update(skip_locked=True))
        for job in jobs:
            if job.status == "validating":
                orphans.append((job.id, queue.TASK_VALIDATE_JOB, queue.DEFAULT_QUEUE))
                continue
            job.worker_id = None
            job.heartbeat_at = now
            add_event(session, job_id=job.id, type="job.requeued", level="warning",
                      message=f"no heartbeat from the worker; round {job.current_round} requeued",
                      data={"attempts": job.attempts})
            orphans.append((job.id, queue.TASK_RUN_ROUND, job.queue))
    return orphans


@celery_app.task(name=queue.TASK_REQUEUE_STALE)
def requeue_stale_jobs() -> int:
    orphans = find_orphans()
    for job_id, task, target in orphans:
        log.warning("requeueing %s (%s)", job_id, task)
        queue.send(task, [job_id], queue=target)
    return len(orphans)


@celery_app.task(name=queue.TASK_PURGE_IDEMPOTENCY)
def purge_idempotency_keys() -> int:
    with session_scope() as session:
        return idempotency.purge_expired(session)
