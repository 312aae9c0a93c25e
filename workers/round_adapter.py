"""Between the Celery task and the pipeline: a claimed round in, a stored round out.

Builds the pipeline's `RoundContext` from the claimed job, wires its hooks to the job monitor
(progress and events into the database, cancellation and lost-lease checks), and names the
finished model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from app.core.config import Settings
from workers.errors import JobCancelled
from workers.job_state import ClaimedRound, JobMonitor, LeaseLost
from workers.liveness import draining
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.round import RoundContext, run_round
from workers.pipeline.train_checkpoint import DrainRequested

CANCEL_CHECK_INTERVAL_S = 1.0


class WorkerDraining(DrainRequested):
    """The worker is shutting down: stop at this batch boundary and hand the round back. Inside
    training (a `DrainRequested`) the Trainer first checkpoints at the current optimizer step, which
    the next run of the train stage resumes from."""


@dataclass(frozen=True)
class RoundOutcome:
    metrics: dict[str, Any]
    model_path: str
    fine_tuned_model: str | None


def fine_tuned_model_name(claim: ClaimedRound, tenant_name: str, suffix: str | None) -> str:
    """OpenAI-style `ft:<base>:<tenant>:<suffix>:<job>`; the base's org prefix is dropped so the
    name stays one URL path segment."""
    base = claim.spec.base_model.rsplit("/", 1)[-1]
    return f"ft:{base}:{tenant_name}:{suffix or ''}:{claim.job_id.removeprefix('job_')}"


def make_hooks(monitor: JobMonitor) -> RoundHooks:
    last_check = 0.0

    def check_cancelled() -> None:
        nonlocal last_check
        now = time.monotonic()
        if now - last_check >= CANCEL_CHECK_INTERVAL_S:
            last_check = now
            monitor.refresh()
        if monitor.lost.is_set():
            raise LeaseLost(monitor.claim.job_id)
        if monitor.cancelled.is_set():
            raise JobCancelled("the job was cancelled")
        if draining():
            raise WorkerDraining("the worker is shutting down")

    def emit_event(level: str, type_: str, message: str, data: dict[str, Any]) -> None:
        monitor.emit_event(level, f"round.{type_}", message, data)

    return RoundHooks(report_progress=monitor.report_progress, emit_event=emit_event,
                      check_cancelled=check_cancelled)


def execute_round(claim: ClaimedRound, monitor: JobMonitor, settings: Settings) -> RoundOutcome:
    context = RoundContext(job_id=claim.job_id, round_index=claim.round, spec=claim.spec, prompts=claim.prompts,
                           artifact_root=settings.resolved_artifact_root, model_root=settings.resolved_model_root,
                           hooks=make_hooks(monitor),
                           judge_endpoint_allowlist=tuple(settings.judge_endpoint_allowlist))
    result = run_round(context)
    # Named after every round: early stopping may make any round the last (job_state decides).
    name = fine_tuned_model_name(claim, claim.tenant_name, claim.suffix)
    return RoundOutcome(metrics=result.metrics, model_path=str(result.model_dir), fine_tuned_model=name)
