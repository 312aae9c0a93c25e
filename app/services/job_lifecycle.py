"""State changes of a job that both the API and the workers make, in one place.

Callers commit, then call `after_commit_notify` so webhooks are enqueued only for states that
are really stored.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import queue
from app.db.base import utcnow
from app.db.models import Job
from app.schemas.jobs import TERMINAL_STATUSES
from app.services.events import add_event


def finish_job(session: Session, job: Job, status: str, *, error_code: str | None = None,
               error_message: str | None = None, message: str | None = None) -> None:
    assert status in TERMINAL_STATUSES, status
    job.status = status
    job.finished_at = utcnow()
    job.worker_id = None
    job.phase = None
    if status == "succeeded":
        job.progress_fraction = 1.0
    if error_code:
        job.error_code = error_code
        job.error_message = error_message or error_code
    level = {"succeeded": "info", "cancelled": "warning", "failed": "error"}[status]
    text = message or {"succeeded": "job succeeded", "cancelled": "job cancelled",
                       "failed": f"job failed: {error_message or error_code}"}[status]
    add_event(session, job_id=job.id, type=f"job.{status}", message=text, level=level,
              data={"error": {"code": error_code, "message": error_message}} if error_code else {})


def after_commit_notify(job: Job) -> None:
    """Enqueue the webhook for a job that just reached a terminal state (never sent inline)."""
    if job.status in TERMINAL_STATUSES and job.webhook_url:
        queue.send(queue.TASK_DELIVER_WEBHOOK, [job.id, f"alignment.job.{job.status}"])
