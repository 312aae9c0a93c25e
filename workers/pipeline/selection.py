"""Job-level decisions after each round, from the rounds' held-out metrics: which round's model is
served, whether another round follows, and whether answers are getting longer too fast.

- Selection (`selection`): "best" serves the round with the highest held-out win rate against the
  base (ties: higher held-out mean reward, then the later round); Merlinite released its peak
  round, not the last. "last" serves the last round run.
- Early stopping (`early_stopping`): after `patience` rounds in a row whose held-out mean reward
  does not beat the best earlier round by more than `min_delta`, no further round runs; the job
  still succeeds.
- Length growth (`length_growth_warning`): a round whose held-out mean length exceeds the previous
  round's (round 1: the base model's) by more than that fraction is flagged.

Pure: no database, no Celery; `workers.job_state` applies the decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.schemas.job_spec import JobSpec

SELECTION_METRIC = "eval_win_rate"
EARLY_STOPPING_METRIC = "eval_mean_reward"
LENGTH_METRIC = "eval_mean_length"


@dataclass(frozen=True)
class LengthGrowth:
    previous: float
    current: float

    @property
    def fraction(self) -> float:
        return (self.current - self.previous) / self.previous if self.previous > 0 else 0.0


@dataclass(frozen=True)
class RoundDecision:
    round: int  # the round just finished
    selected_round: int  # whose model the job serves (so far)
    more_rounds: bool  # whether another round follows
    early_stopped: bool
    stop_reason: str | None  # a sentence for the event when early_stopped
    length_growth: LengthGrowth | None
    length_warning: bool


def _metric(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else float("-inf")


def select_round(history: Sequence[Mapping[str, Any]], selection: str) -> int:
    """1-based round to serve; `history[i]` holds round i + 1's metrics."""
    if not history:
        raise ValueError("no finished round to select from")
    if selection == "last":
        return len(history)
    return max(range(len(history)), key=lambda i: (_metric(history[i], SELECTION_METRIC),
                                                  _metric(history[i], EARLY_STOPPING_METRIC), i)) + 1


def rounds_without_improvement(history: Sequence[Mapping[str, Any]], min_delta: float) -> int:
    """How many of the last rounds in a row failed to beat the best round before them by > min_delta."""
    best = _metric(history[0], EARLY_STOPPING_METRIC) if history else float("-inf")
    stale = 0
    for metrics in history[1:]:
        value = _metric(metrics, EARLY_STOPPING_METRIC)
        if value > best + min_delta:
            best, stale = value, 0
        else:
            stale += 1
    return stale


def length_growth(history: Sequence[Mapping[str, Any]]) -> LengthGrowth | None:
    current = history[-1].get(LENGTH_METRIC)
    previous = history[-2].get(LENGTH_METRIC) if len(history) > 1 else history[-1].get("eval_base_mean_length")
    if not isinstance(current, int | float) or not isinstance(previous, int | float):
        return None
    return LengthGrowth(previous=float(previous), current=float(current))


def decide(history: Sequence[Mapping[str, Any]], spec: JobSpec) -> RoundDecision:
    """The decision after round `len(history)`, given every finished round's metrics in order."""
    n = len(history)
    early_stopped, reason = False, None
    stopping = spec.early_stopping
    if stopping is not None and n < spec.rounds:
        stale = rounds_without_improvement(history, stopping.min_delta)
        if stale >= stopping.patience:
            early_stopped = True
            reason = (f"early stopping after round {n} of {spec.rounds}: the held-out mean reward has not "
                      f"improved by more than {stopping.min_delta:g} for {stale} round(s) (patience "
                      f"{stopping.patience})")
    growth = length_growth(history)
    warning = (spec.length_growth_warning is not None and growth is not None
               and growth.fraction > spec.length_growth_warning)
    return RoundDecision(round=n, selected_round=select_round(history, spec.selection),
                         more_rounds=n < spec.rounds and not early_stopped, early_stopped=early_stopped,
                         stop_reason=reason, length_growth=growth, length_warning=warning)
