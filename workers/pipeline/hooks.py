"""What the caller (the Celery task, a test, the benchmark) lets a round report and check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _ignore_progress(phase: str, fraction: float) -> None:
    return None


def _ignore_event(level: str, type_: str, message: str, data: dict[str, Any]) -> None:
    return None


def _never_cancelled() -> None:
    return None


@dataclass
class RoundHooks:
    """Callables injected into a round.

    - `report_progress(phase, fraction)`: `phase` is the running stage (split, generate, score,
      pair, train, evaluate); `fraction` is the round's overall progress in [0, 1].
    - `emit_event(level, type, message, data)`: level is info | warning | error; type a stable
      slug (stage_started, stage_completed, stage_skipped, pairs_dropped, ...); data JSON-able.
    - `check_cancelled()`: raises `workers.errors.JobCancelled` when the job was cancelled. Called
      between stages and at batch boundaries inside generate, score, train and evaluate.
    """

    report_progress: Callable[[str, float], None] = field(default=_ignore_progress)
    emit_event: Callable[[str, str, str, dict[str, Any]], None] = field(default=_ignore_event)
    check_cancelled: Callable[[], None] = field(default=_never_cancelled)
