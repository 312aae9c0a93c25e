"""Stopping a training run at an optimizer step, with a checkpoint when the worker drains.

A draining worker (SIGTERM, or `$ALIGND_HOME/drain`; see workers/liveness.py) makes the round's
`check_cancelled` hook raise a `DrainRequested`. Inside training that is caught at the end of an
optimizer step: the HF Trainer saves its own checkpoint (model or adapter, optimizer, scheduler,
RNG states, trainer_state.json) as `<scratch>/checkpoint-<step>`, training stops, and the
exception is raised again so the round is handed back. The next run of the train stage resumes
from that checkpoint with `trainer.train(resume_from_checkpoint=...)`. A cancel (or any other
exception the hook raises) stops at once, without a checkpoint.

The Trainer writes a checkpoint directory file by file, so a process killed mid-save leaves a
half-written one. A checkpoint is only used once `alignd-checkpoint.json` is in it: written last
(atomically, by the main rank, after every rank finished its part) and recording a fingerprint of
the run (config, starting policy, data size, world size). Directories without it, or with another
run's fingerprint, are deleted before training starts; only the newest complete one is kept.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from workers.pipeline import artifacts
from workers.pipeline.hooks import RoundHooks

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR
COMPLETE_MARKER = "alignd-checkpoint.json"


class DrainRequested(Exception):
    """Raised by a `check_cancelled` hook when the worker is going away but the job goes on:
    training checkpoints at the current optimizer step before letting it propagate."""


def run_fingerprint(config: Any, start: Any, *, samples: int, world_size: int) -> str:
    """What a checkpoint must match to be resumed: the same config, start, data size and ranks."""
    identity = {"config": asdict(config), "start": asdict(start), "samples": samples, "world_size": world_size}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TrainerCheckpoints:
    """The `checkpoint-<step>` directories the Trainer writes under `scratch_dir`."""

    scratch_dir: Path
    fingerprint: str

    def _all(self) -> list[tuple[int, Path]]:
        if not self.scratch_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.scratch_dir.iterdir()
                 if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name))]
        return sorted(found)

    def _is_usable(self, step: int, path: Path) -> bool:
        marker = path / COMPLETE_MARKER
        if not marker.is_file():
            return False
        try:
            recorded = artifacts.read_json(marker)
        except (OSError, ValueError):
            return False
        return recorded.get("fingerprint") == self.fingerprint and recorded.get("step") == step

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this run, or None."""
        usable = [path for step, path in self._all() if self._is_usable(step, path)]
        return usable[-1] if usable else None

    def remove_unusable(self) -> list[Path]:
        """Delete half-written checkpoints and other runs' (main rank only); returns what went."""
        removed = [path for step, path in self._all() if not self._is_usable(step, path)]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def mark_complete(self, step: int) -> Path:
        """Record `checkpoint-<step>` as complete, then drop the older ones (marker first, so a
        deletion cut short never leaves a marked but gutted checkpoint)."""
        path = self.scratch_dir / f"checkpoint-{step}"
        artifacts.atomic_write_json(path / COMPLETE_MARKER, {"fingerprint": self.fingerprint, "step": step})
        for other_step, other in self._all():
            if other_step != step:
                (other / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(other, ignore_errors=True)
        return path


def wait_for_every_rank() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def checkpoint_to_resume(checkpoints: TrainerCheckpoints, *, is_main_rank: bool) -> Path | None:
    """Clean up unusable checkpoints (main rank) and return the one to resume from, if any."""
    if is_main_rank:
        checkpoints.remove_unusable()
    wait_for_every_rank()
    return checkpoints.latest()


def stop_and_checkpoint_callback(hooks: RoundHooks, progress: Callable[[float], None],
                                 checkpoints: TrainerCheckpoints) -> Any:
    """A TrainerCallback: progress after each optimizer step, cancel and drain checks (see above)."""
    from transformers import TrainerCallback

    class StopAndCheckpoint(TrainerCallback):
        def __init__(self) -> None:
            self.drain: DrainRequested | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            hooks.check_cancelled()  # no step run yet in this session: nothing new to checkpoint

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.max_steps:
                progress(state.global_step / state.max_steps)
            if state.global_step >= state.max_steps:
                return  # the last step: finishing (and saving the model) beats a checkpoint
            try:
                hooks.check_cancelled()
            except DrainRequested as drain:
                self.drain = drain
                control.should_save = True  # the Trainer saves checkpoint-<global_step> right after this
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            wait_for_every_rank()  # every rank has written its shards, optimizer and RNG state
            if args.should_save:
                checkpoints.mark_complete(state.global_step)

        def raise_if_drained(self) -> None:
            if self.drain is not None:
                raise self.drain

    return StopAndCheckpoint()


def whole_run_train_loss(log_history: list[dict[str, Any]], fallback: float) -> float:
    """Mean loss per optimizer step over the whole run, checkpointed steps included (the Trainer's
    own `training_loss` only covers the steps of the last `train()` call). Each logged loss is the
    mean over the steps since the previous log."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > previous:
            total += float(entry["loss"]) * (entry["step"] - previous)
            previous = entry["step"]
    return total / previous if previous else fallback
