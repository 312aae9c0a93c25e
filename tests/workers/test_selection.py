"""Job-level decisions from per-round held-out metrics: the served round, early stopping, length growth."""

from __future__ import annotations

import pytest

from app.schemas.job_spec import JobSpec
from workers.pipeline.selection import decide, select_round


def _spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"base_model": "tiny-mistral", "prompt_set": "ps", "rounds": 4, **fields})


def _round(win_rate: float, reward: float, length: float = 10.0, base_length: float = 10.0) -> dict:
    return {"eval_win_rate": win_rate, "eval_mean_reward": reward, "eval_mean_length": length,
            "eval_base_mean_length": base_length}


def test_best_selection_serves_the_peak_round_when_a_later_round_is_worse():
    history = [_round(0.6, 1.0), _round(0.8, 2.0), _round(0.55, 2.5)]  # round 3 over-trained
    decision = decide(history, _spec())
    assert decision.selected_round == 2 and decision.more_rounds
    assert decide(history, _spec(selection="last")).selected_round == 3
    assert select_round([_round(0.7, 1.0), _round(0.7, 1.5)], "best") == 2  # tie: higher reward


def test_early_stopping_after_patience_rounds_without_improvement():
    spec = _spec(early_stopping={"patience": 2, "min_delta": 0.1})
    assert decide([_round(0.6, 1.0), _round(0.7, 1.05)], spec).more_rounds  # one stale round
    decision = decide([_round(0.6, 1.0), _round(0.7, 1.05), _round(0.65, 0.9)], spec)
    assert decision.early_stopped and not decision.more_rounds and decision.round == 3
    assert "patience 2" in decision.stop_reason and decision.selected_round == 2
    improving = decide([_round(0.6, 1.0), _round(0.7, 1.05), _round(0.75, 1.2)], spec)
    assert improving.more_rounds and not improving.early_stopped
    last = decide([_round(0.6, 1.0)] * 4, spec)  # the last round ends the job, not early stopping
    assert not last.more_rounds and not last.early_stopped
    assert decide([_round(0.6, 1.0)] * 3, _spec()).more_rounds  # no early_stopping: never stops early


def test_length_growth_is_flagged_against_the_previous_round_or_the_base():
    spec = _spec(length_growth_warning=0.2)
    first = decide([_round(0.6, 1.0, length=13.0, base_length=10.0)], spec)
    assert first.length_warning and first.length_growth.fraction == pytest.approx(0.3)
    calm = decide([_round(0.6, 1.0, length=13.0), _round(0.6, 1.0, length=15.0)], spec)
    assert not calm.length_warning and calm.length_growth.fraction == pytest.approx(2 / 13)
    assert not decide([_round(0.6, 1.0, length=30.0)], _spec(length_growth_warning=None)).length_warning
