"""Best-of-N reranking (rerank queue) and the purge of old rerank requests (default queue).

`rerank` takes a `rerank_requests` id, re-reads the row and the job's reward model, writes the
scores (or the failure) back; the API polls the row. A request already answered is left alone,
so a second delivery is harmless. Nothing here imports torch at module level: the default worker
that runs the purge has no ML stack.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from app import queue
from app.core.config import get_settings
from app.db.base import utcnow
from app.db.models import Job, RerankRequest
from app.db.session import session_scope
from app.schemas.job_spec import JobSpec
from app.services.rerank import purge_finished
from workers.celery_app import celery_app
from workers.errors import PipelineError

log = logging.getLogger("alignd.rerank")


def _finish(request_id: str, *, scores: list[float] | None = None, error: str | None = None) -> None:
    with session_scope() as session:
        row = session.get(RerankRequest, request_id)
        if row is None or row.status != "pending":
            return
        row.status = "failed" if error else "succeeded"
        row.scores = scores
        row.error_message = error
        row.finished_at = utcnow()


@celery_app.task(name=queue.TASK_RERANK, acks_late=True)
def rerank(request_id: str) -> None:
    from workers.serving.rerank import score_candidates

    with session_scope() as session:
        row = session.get(RerankRequest, request_id)
        if row is None or row.status != "pending":
            return
        spec_json = session.scalar(select(Job.spec).where(Job.id == row.job_id))
        prompt, candidates = row.prompt, list(row.candidates)
    reward_model = JobSpec.model_validate(spec_json).reward_model
    try:
        scores = score_candidates(reward_model, get_settings(), prompt, candidates)
    except PipelineError as exc:
        _finish(request_id, error=f"[{exc.code}] {exc.message}")
        return
    except Exception as exc:
        log.exception("rerank %s failed", request_id)
        _finish(request_id, error=f"internal error: {type(exc).__name__}")
        raise
    _finish(request_id, scores=scores)


@celery_app.task(name=queue.TASK_PURGE_RERANK_REQUESTS)
def purge_rerank_requests() -> int:
    return purge_finished()
