"""`record_round_success` applies the selection decision in the database: the served round is
marked in the round rows, an early stop finishes the job `succeeded` with its reason in an event,
and length growth warns. Rounds are recorded directly (no models): the decision, not the training,
is under test."""

from __future__ import annotations

from sqlalchemy import select

from app.db.models import Job, JobEvent, JobRound
from app.db.session import session_scope
from tests.app.helpers import create_job, upload
from workers.job_state import claim_round, record_round_success


def _queued_job(api, **fields) -> str:
    job = create_job(api, upload(api).json()["id"], **{"rounds": 4, **fields}).json()
    with session_scope() as session:
        session.get(Job, job["id"]).status = "queued"
    return job["id"]


def _record(job_id: str, win_rate: float, reward: float, length: float = 10.0) -> str | None:
    claim = claim_round(job_id)
    assert claim is not None
    metrics = {"eval_win_rate": win_rate, "eval_mean_reward": reward, "eval_mean_length": length,
               "eval_base_mean_length": 10.0}
    return record_round_success(claim, metrics, f"/artifacts/{job_id}/round-{claim.round}/model",
                                f"ft:tiny-mistral:acme::{job_id}")


def test_early_stop_ends_the_job_succeeded_and_serves_the_best_round(api):
    job_id = _queued_job(api, early_stopping={"patience": 1, "min_delta": 0.0}, length_growth_warning=0.25)
    assert _record(job_id, 0.6, 1.0) == "gpu"
    assert _record(job_id, 0.8, 2.0, length=13.0) == "gpu"  # 30% longer than round 1: a warning
    assert _record(job_id, 0.5, 1.5) is None  # worse: early stop after round 3 of 4
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job.status == "succeeded" and job.current_round == 3 and job.fine_tuned_model
        rows = session.scalars(select(JobRound).where(JobRound.job_id == job_id).order_by(JobRound.round)).all()
        assert [r.metrics["selected"] for r in rows] == [False, True, False]
        events = {e.type: e for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))}
    assert "early stopping after round 3 of 4" in events["job.early_stopped"].message
    assert events["job.round_selected"].data["round"] == 2
    assert events["round.length_growth"].level == "warning" and events["round.length_growth"].data["round"] == 2
    assert "job.succeeded" in events
    response = api.http.get(f"/v1/jobs/{job_id}/rounds", headers=api.headers()).json()["data"]
    assert [r["metrics"]["selected"] for r in response] == [False, True, False]


def test_last_selection_serves_the_last_round(api):
    job_id = _queued_job(api, rounds=2, selection="last")
    _record(job_id, 0.9, 3.0)
    assert _record(job_id, 0.5, 1.0) is None
    with session_scope() as session:
        rows = session.scalars(select(JobRound).where(JobRound.job_id == job_id).order_by(JobRound.round)).all()
        assert [r.metrics["selected"] for r in rows] == [False, True]
        assert session.get(Job, job_id).status == "succeeded"
