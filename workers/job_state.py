"""The database side of running a round: claim, heartbeat, progress, record, finish.

A job is run by at most one worker at a time: the worker that claims it writes its id and a
heartbeat; a second delivery of the same task sees a fresh heartbeat and leaves. When the
heartbeat goes stale (the worker was killed), housekeeping requeues the job and the next claim
counts one more attempt; past `max_attempts` for one round the job fails.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from app.core.config import get_settings
from app.db.base import utcnow
from app.db.models import Job, JobRound, PromptSet, Tenant
from app.db.session import session_scope
from app.schemas.job_spec import JobSpec
from app.services.events import add_event
from app.services.job_lifecycle import after_commit_notify, finish_job
from workers.liveness import touch_heartbeat
from workers.pipeline.selection import EARLY_STOPPING_METRIC, SELECTION_METRIC, RoundDecision, decide

log = logging.getLogger("alignd.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ClaimedRound:
    job_id: str
    round: int
    rounds: int
    spec: JobSpec
    prompts: list[list[dict[str, str]]]
    tenant_id: str
    tenant_name: str
    suffix: str | None


def claim_round(job_id: str) -> ClaimedRound | None:
    """Take the job's next round for this worker, or None when there is nothing to do here."""
    settings = get_settings()
    finished_job = None
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status not in ("queued", "running"):
            return None
        fresh = utcnow() - timedelta(seconds=settings.stale_after_s)
        if job.worker_id and job.worker_id != WORKER_ID and job.heartbeat_at and job.heartbeat_at > fresh:
            log.info("job %s is being run by %s; duplicate delivery ignored", job_id, job.worker_id)
            return None
        if job.cancel_requested:
            finish_job(session, job, "cancelled")
            finished_job = job
        else:
            job.attempts += 1
            round_no = job.current_round if job.status == "running" and job.current_round else 1
            if job.attempts > settings.max_attempts:
                finish_job(session, job, "failed", error_code="worker_lost",
                           error_message=f"round {round_no} was interrupted {job.attempts - 1} times "
                                         f"(the worker died or was killed); giving up")
                _set_round_status(session, job.id, round_no, "failed")
                finished_job = job
            else:
                now = utcnow()
                job.status = "running"
                job.started_at = job.started_at or now
                job.current_round = round_no
                job.worker_id = WORKER_ID
                job.heartbeat_at = now
                if session.get(JobRound, (job.id, round_no)) is None:
                    session.add(JobRound(job_id=job.id, round=round_no, status="running", started_at=now))
                    add_event(session, job_id=job.id, type="round.started",
                              message=f"round {round_no}/{job.rounds} started", data={"round": round_no})
                else:
                    add_event(session, job_id=job.id, type="round.resumed", level="warning",
                              message=f"round {round_no} resumed (attempt {job.attempts})",
                              data={"round": round_no, "attempt": job.attempts})
                prompt_set = session.get(PromptSet, job.prompt_set_id)
                tenant = session.get(Tenant, job.tenant_id)
                claimed = ClaimedRound(job_id=job.id, round=round_no, rounds=job.rounds,
                                       spec=JobSpec.model_validate(job.spec),
                                       prompts=list(prompt_set.prompts or []), tenant_id=job.tenant_id,
                                       tenant_name=tenant.name, suffix=job.suffix)
    if finished_job is not None:
        after_commit_notify(finished_job)
        return None
    return claimed


def _set_round_status(session, job_id: str, round_no: int, status: str,  # noqa: ANN001
                      metrics: dict[str, Any] | None = None, model_path: str | None = None) -> None:
    row = session.get(JobRound, (job_id, round_no))
    if row is None:
        return
    row.status = status
    row.finished_at = utcnow()
    if metrics is not None:
        row.metrics = metrics
    if model_path is not None:
        row.model_path = model_path


class LeaseLost(Exception):
    """Another worker took the job over (this one looked dead); stop without touching state."""


class JobMonitor:
    """Heartbeats in a thread, reports progress, and answers "was I cancelled?" cheaply."""

    def __init__(self, claim: ClaimedRound) -> None:
        self.claim = claim
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{claim.job_id}", daemon=True)
        self._last_progress = 0.0
        self._last_phase: str | None = None

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        interval = get_settings().heartbeat_interval_s
        while not self._stop.wait(interval):
            try:
                self.beat_once()
            except Exception:  # noqa: BLE001 — a missed beat is retried; staleness is the signal
                log.exception("heartbeat for %s failed", self.claim.job_id)

    def beat_once(self) -> None:
        touch_heartbeat()
        with session_scope() as session:
            result = session.execute(update(Job).where(Job.id == self.claim.job_id, Job.worker_id == WORKER_ID)
                                     .values(heartbeat_at=utcnow()))
            if result.rowcount == 0:
                self.lost.set()
            elif session.scalar(select(Job.cancel_requested).where(Job.id == self.claim.job_id)):
                self.cancelled.set()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def refresh(self) -> None:
        """Check the database now (between stages), not only at the next heartbeat."""
        self.beat_once()

    def report_progress(self, phase: str, fraction: float) -> None:
        now = time.monotonic()
        if phase == self._last_phase and now - self._last_progress < 1.0:
            return
        self._last_phase, self._last_progress = phase, now
        overall = (self.claim.round - 1 + max(0.0, min(1.0, fraction))) / self.claim.rounds
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == self.claim.job_id, Job.worker_id == WORKER_ID)
                            .values(phase=phase, progress_fraction=overall, heartbeat_at=utcnow()))

    def emit_event(self, level: str, type: str, message: str, data: dict[str, Any] | None = None) -> None:
        with session_scope() as session:
            add_event(session, job_id=self.claim.job_id, type=type, message=message, level=level,
                      data={"round": self.claim.round, **(data or {})})


def record_round_success(claim: ClaimedRound, metrics: dict[str, Any], model_path: str,
                         fine_tuned_model: str | None) -> str | None:
    """Store the round and apply `selection.decide`: mark the served round (`metrics["selected"]` on
    the job's round rows), warn about length growth, and finish the job after the last round or an
    early stop. Returns the next round's queue, or None when the job is finished."""
    job_to_notify = None
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == claim.job_id).with_for_update())
        if job is None or job.worker_id != WORKER_ID:
            raise LeaseLost(claim.job_id)
        rows = list(session.scalars(select(JobRound).where(JobRound.job_id == job.id, JobRound.round <= claim.round)
                                    .order_by(JobRound.round)))
        history = [metrics if row.round == claim.round else (row.metrics or {}) for row in rows]
        decision = decide(history, claim.spec)
        for row in rows:
            if row.round != claim.round:
                row.metrics = {**(row.metrics or {}), "selected": row.round == decision.selected_round}
        metrics = {**metrics, "selected": decision.selected_round == claim.round}
        _set_round_status(session, job.id, claim.round, "succeeded", metrics=metrics, model_path=model_path)
        add_event(session, job_id=job.id, type="round.completed", data={"round": claim.round, "metrics": metrics},
                  message=f"round {claim.round}/{job.rounds} completed")
        _record_decision(session, job, claim, decision)
        job.attempts = 0
        job.progress_fraction = claim.round / job.rounds
        if not decision.more_rounds:
            job.fine_tuned_model = fine_tuned_model
            finish_job(session, job, "succeeded")
            job_to_notify = job
        else:
            job.current_round = claim.round + 1
            job.worker_id = None
            job.heartbeat_at = utcnow()
            job.phase = None
            next_queue = job.queue
    if job_to_notify is not None:
        after_commit_notify(job_to_notify)
        return None
    return next_queue


def _record_decision(session, job: Job, claim: ClaimedRound, decision: RoundDecision) -> None:  # noqa: ANN001
    spec = claim.spec
    growth = decision.length_growth
    if decision.length_warning and growth is not None:
        add_event(session, job_id=job.id, type="round.length_growth", level="warning",
                  message=f"held-out mean length grew {growth.fraction:.0%} in round {claim.round} "
                          f"({growth.previous:.1f} -> {growth.current:.1f} tokens), more than the "
                          f"{spec.length_growth_warning:.0%} warning threshold",
                  data={"round": claim.round, "previous_mean_length": growth.previous,
                        "mean_length": growth.current, "growth": growth.fraction,
                        "threshold": spec.length_growth_warning})
    if decision.early_stopped:
        stopping = spec.early_stopping
        add_event(session, job_id=job.id, type="job.early_stopped", message=decision.stop_reason or "early stop",
                  data={"round": claim.round, "rounds": job.rounds, "metric": EARLY_STOPPING_METRIC,
                        "patience": stopping.patience if stopping else None,
                        "min_delta": stopping.min_delta if stopping else None})
    if not decision.more_rounds:
        add_event(session, job_id=job.id, type="job.round_selected",
                  message=f"serving round {decision.selected_round} (selection {spec.selection!r}: "
                          f"{SELECTION_METRIC} is the held-out win rate against the base)",
                  data={"round": decision.selected_round, "selection": spec.selection,
                        "metric": SELECTION_METRIC})


def release_round(claim: ClaimedRound, reason: str) -> str | None:
    """Hand an unfinished round back (the worker is shutting down): not a failed attempt. Returns
    the queue to send the job to, or None if another worker already owns it."""
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == claim.job_id).with_for_update())
        if job is None or job.worker_id != WORKER_ID:
            return None
        job.worker_id = None
        job.attempts = max(0, job.attempts - 1)
        job.heartbeat_at = utcnow()
        add_event(session, job_id=job.id, type="round.released", level="warning",
                  message=f"round {claim.round} handed back to the queue: {reason}", data={"round": claim.round})
        return job.queue


def record_round_end(claim: ClaimedRound, status: str, *, error_code: str | None = None,
                     error_message: str | None = None) -> None:
    """The round (and so the job) ended cancelled or failed."""
    with session_scope() as session:
        job = session.scalar(select(Job).where(Job.id == claim.job_id).with_for_update())
        if job is None or job.worker_id != WORKER_ID:
            raise LeaseLost(claim.job_id)
        _set_round_status(session, job.id, claim.round, status)
        finish_job(session, job, status, error_code=error_code, error_message=error_message)
    after_commit_notify(job)
