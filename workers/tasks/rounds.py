"""The GPU task: run one round of a job, then enqueue the next. Thin: state lives in job_state,
the work in workers.pipeline."""

from __future__ import annotations

import logging

from app import queue
from app.core.config import get_settings
from workers.celery_app import celery_app
from workers.errors import JobCancelled, PipelineError
from workers.job_state import (
    ClaimedRound,
    JobMonitor,
    LeaseLost,
    claim_round,
    record_round_end,
    record_round_success,
    release_round,
)
from workers.round_adapter import WorkerDraining, execute_round

log = logging.getLogger("alignd.worker")


@celery_app.task(name=queue.TASK_RUN_ROUND, acks_late=True)
def run_round(job_id: str) -> None:
    claim = claim_round(job_id)
    if claim is None:
        return
    try:
        with JobMonitor(claim) as monitor:
            outcome = execute_round(claim, monitor, get_settings())
    except LeaseLost:
        log.warning("job %s was taken over by another worker; leaving it", job_id)
        return
    except WorkerDraining as exc:
        target = release_round(claim, str(exc))
        if target is not None:
            queue.send(queue.TASK_RUN_ROUND, [job_id], queue=target)
        return
    except JobCancelled:
        _end(claim, "cancelled")
        return
    except PipelineError as exc:
        _end(claim, "failed", error_code=exc.code, error_message=exc.message)
        return
    except Exception as exc:
        log.exception("round %s of %s failed unexpectedly", claim.round, job_id)
        _end(claim, "failed", error_code="internal_error", error_message=f"{type(exc).__name__}: {exc}")
        raise
    next_queue = record_round_success(claim, outcome.metrics, outcome.model_path, outcome.fine_tuned_model)
    if next_queue is not None:
        queue.send(queue.TASK_RUN_ROUND, [job_id], queue=next_queue)


def _end(claim: ClaimedRound, status: str, **error: str) -> None:
    try:
        record_round_end(claim, status, **error)
    except LeaseLost:
        log.warning("job %s was taken over by another worker; not marking it %s", claim.job_id, status)
