"""What the worker and the training ranks of a multi-GPU train stage exchange, all through files.

The worker writes a `TrainRequest` (`<round>/train_request.json`) and starts the ranks
(`workers.distributed`); the ranks (`workers.pipeline.train_entry`) cannot see the worker's
memory, so everything else goes through the request's control directory (`TrainControl`):

    cancel              written by the worker: stop at the next optimizer step, no checkpoint
    drain               written by the worker: checkpoint at the next optimizer step, then stop
    progress.json       rank 0: the fraction of optimizer steps done
    outcome.json        rank 0, last: completed (with the TrainResult), drained or cancelled
    rank-<r>-error.json a rank that hit a pipeline error (code, message) before exiting non-zero
                        (r is `before-init` when it failed before the process group existed)

The ranks also stop for `$ALIGND_HOME/drain` (the preStop hook's file), which every process of the
pod sees. The worker clears the directory before each launch, so no marker outlives its attempt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from workers.errors import PipelineError
from workers.pipeline import artifacts
from workers.pipeline.train import LoraSettings, StartingPolicy, TrainConfig, TrainResult

StopKind = Literal["cancel", "drain"]
OutcomeStatus = Literal["completed", "drained", "cancelled"]


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value is not None else None


@dataclass(frozen=True)
class TrainRequest:
    """One train stage: the same inputs `train_dpo`/`train_sft` take in process."""

    config: TrainConfig
    start: StartingPolicy
    pairs_dir: Path
    out_dir: Path
    scratch_dir: Path
    control_dir: Path

    @property
    def control(self) -> TrainControl:
        return TrainControl(self.control_dir)

    def to_json(self) -> dict[str, Any]:
        start = self.start
        return {
            "algorithm": self.config.algorithm,  # also in config; here so a person reading the file sees it
            "config": asdict(self.config),
            "start": {"base_location": start.base_location,
                      "adapter_dir": str(start.adapter_dir) if start.adapter_dir else None,
                      "full_model_dir": str(start.full_model_dir) if start.full_model_dir else None},
            "pairs_dir": str(self.pairs_dir), "out_dir": str(self.out_dir),
            "scratch_dir": str(self.scratch_dir), "control_dir": str(self.control_dir),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainRequest:
        config = dict(data["config"])
        config["lora"] = LoraSettings(**config["lora"])
        start = data["start"]
        return cls(config=TrainConfig(**config),
                   start=StartingPolicy(base_location=start["base_location"],
                                        adapter_dir=_optional_path(start["adapter_dir"]),
                                        full_model_dir=_optional_path(start["full_model_dir"])),
                   pairs_dir=Path(data["pairs_dir"]), out_dir=Path(data["out_dir"]),
                   scratch_dir=Path(data["scratch_dir"]), control_dir=Path(data["control_dir"]))

    def write(self, path: Path) -> None:
        artifacts.atomic_write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> TrainRequest:
        return cls.from_json(artifacts.read_json(path))


@dataclass(frozen=True)
class TrainOutcome:
    status: OutcomeStatus
    result: TrainResult | None = None


@dataclass(frozen=True)
class TrainControl:
    """The control directory of one launch (see the module docstring)."""

    directory: Path

    def reset(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)

    # -- stop markers: the worker writes, rank 0 reads ----------------------------------------------
    def request_stop(self, kind: StopKind) -> None:
        artifacts.atomic_write_text(self.directory / kind, kind)

    def stop_requested(self, drain_files: tuple[Path, ...] = ()) -> StopKind | None:
        if (self.directory / "cancel").exists():
            return "cancel"
        if (self.directory / "drain").exists() or any(path.exists() for path in drain_files):
            return "drain"
        return None

    # -- progress: rank 0 writes, the worker reads ----------------------------------------------------
    def write_progress(self, fraction: float) -> None:
        artifacts.atomic_write_json(self.directory / "progress.json", {"fraction": fraction})

    def read_progress(self) -> float | None:
        try:
            return float(artifacts.read_json(self.directory / "progress.json")["fraction"])
        except (OSError, ValueError, KeyError):
            return None

    # -- how the ranks ended ----------------------------------------------------------------------------
    def write_outcome(self, status: OutcomeStatus, result: TrainResult | None = None) -> None:
        artifacts.atomic_write_json(self.directory / "outcome.json",
                                    {"status": status, "result": asdict(result) if result else None})

    def read_outcome(self) -> TrainOutcome | None:
        path = self.directory / "outcome.json"
        if not path.is_file():
            return None
        data = artifacts.read_json(path)
        result = TrainResult(**data["result"]) if data["result"] is not None else None
        return TrainOutcome(status=data["status"], result=result)

    def write_rank_error(self, rank: int, error: PipelineError) -> None:
        name = f"rank-{rank if rank >= 0 else 'before-init'}-error.json"
        artifacts.atomic_write_json(self.directory / name,
                                    {"code": error.code, "message": error.message, "type": type(error).__name__,
                                     "data": json.loads(json.dumps(error.data, default=str))})

    def first_rank_error(self) -> PipelineError | None:
        """The first pipeline error a rank wrote, rebuilt with its code (e.g. gpu_out_of_memory)."""
        files = sorted(self.directory.glob("rank-*-error.json"), key=lambda p: p.stat().st_mtime_ns)
        if not files:
            return None
        data = artifacts.read_json(files[0])
        return PipelineError(data["message"], code=data["code"], data=data.get("data"))
