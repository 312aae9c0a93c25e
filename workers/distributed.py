"""Training across several GPUs of one worker: `accelerate launch` with DeepSpeed ZeRO-3.

A model too big for one GPU (full fine-tuning of 7B and up) trains with its parameters, gradients
and optimizer state sharded over every GPU the worker holds, one process per GPU. The worker
process itself stays a single process (Celery solo pool): `train_with_ranks` writes the round's
`TrainRequest` to a JSON file, runs the ranks (`workers.pipeline.train_entry`) as children of
`launch_distributed_training`, and reads back the `TrainResult` rank 0 left in the request's
control directory. While they run, the worker polls its own hooks (cancel, lost lease, drain) and
passes a stop on as a marker file (`workers.pipeline.train_request`), and relays the ranks'
progress.

Production launches with `zero3_launch_config()`: `deploy/accelerate/zero3.yaml` (launcher) and
`deploy/deepspeed/zero3.json` (bf16, ZeRO stage 3, no offload, batch sizes filled in by the HF
Trainer), and needs DeepSpeed, a GPU-image dependency that is only looked for here, never
imported. A `LaunchConfig` without a DeepSpeed file is a plain multi-process launch (the tests run
two CPU ranks over gloo that way).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from workers.errors import PipelineError
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.train import TrainResult
from workers.pipeline.train_checkpoint import DrainRequested
from workers.pipeline.train_request import TrainControl, TrainRequest

TRAIN_ENTRY_MODULE = "workers.pipeline.train_entry"
ACCELERATE_CONFIG = Path("accelerate") / "zero3.yaml"
DEEPSPEED_CONFIG = Path("deepspeed") / "zero3.json"
# The images keep the source tree at /app (editable install), so this is /app/deploy there too.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "deploy"
DISTRIBUTED_BACKENDS = ("accelerate", "deepspeed")
POLL_INTERVAL_S = 1.0
_LOG_TAIL_LINES = 40
_TERMINATE_GRACE_S = 30.0


class DistributedBackendMissing(PipelineError):
    """accelerate or DeepSpeed is not installed where the worker runs (only the GPU image has both)."""

    code = "distributed_backend_missing"


class DistributedTrainingFailed(PipelineError):
    """`accelerate launch` exited non-zero: a rank crashed, ran out of memory or lost its peers."""

    code = "distributed_training_failed"


@dataclass(frozen=True)
class LaunchConfig:
    """The files `accelerate launch` reads: its YAML, and the DeepSpeed JSON when it uses DeepSpeed."""

    accelerate_config: Path
    deepspeed_config: Path | None = None

    @property
    def backends(self) -> tuple[str, ...]:
        return DISTRIBUTED_BACKENDS if self.deepspeed_config is not None else ("accelerate",)


def config_paths(config_dir: Path = DEFAULT_CONFIG_DIR) -> tuple[Path, Path]:
    """(accelerate YAML, DeepSpeed JSON) under `config_dir`, both required to exist."""
    accelerate_config = (config_dir / ACCELERATE_CONFIG).resolve()
    deepspeed_config = (config_dir / DEEPSPEED_CONFIG).resolve()
    for path in (accelerate_config, deepspeed_config):
        if not path.is_file():
            raise FileNotFoundError(f"distributed training config missing: {path}")
    return accelerate_config, deepspeed_config


def zero3_launch_config(config_dir: Path = DEFAULT_CONFIG_DIR) -> LaunchConfig:
    """The production launch: DeepSpeed ZeRO-3 with the files under `deploy/`."""
    accelerate_config, deepspeed_config = config_paths(config_dir)
    return LaunchConfig(accelerate_config=accelerate_config, deepspeed_config=deepspeed_config)


def missing_distributed_backends(backends: tuple[str, ...] = DISTRIBUTED_BACKENDS) -> list[str]:
    """The launch dependencies this interpreter cannot import (without importing them)."""
    return [name for name in backends if importlib.util.find_spec(name) is None]


def require_distributed_backend(launch: LaunchConfig | None = None) -> None:
    missing = missing_distributed_backends(launch.backends if launch is not None else DISTRIBUTED_BACKENDS)
    if missing:
        raise DistributedBackendMissing(
            f"multi-GPU training needs {' and '.join(missing)}, which this worker does not have; "
            "run multi-GPU jobs on the GPU image (alignd worker target)",
            data={"missing": missing},
        )


def build_launch_command(num_gpus: int, train_request_path: Path, *,
                         launch: LaunchConfig | None = None) -> list[str]:
    """The argv of `accelerate launch ... -m workers.pipeline.train_entry <request.json>`.

    `accelerate launch` is run as `python -m accelerate.commands.launch` with this interpreter, so
    the ranks use the worker's own environment whatever PATH says. The DeepSpeed file is passed
    as an absolute path: the YAML's relative one only holds from the repository root.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    launch = launch or zero3_launch_config()
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.accelerate_config)]
    if launch.deepspeed_config is not None:
        argv += ["--deepspeed_config_file", str(launch.deepspeed_config)]
    return argv + [
        "--num_processes", str(num_gpus),
        "--num_machines", "1",
        "-m", TRAIN_ENTRY_MODULE,
        str(Path(train_request_path).resolve()),
    ]


def launch_distributed_training(num_gpus: int, train_request_path: Path, *,
                                launch: LaunchConfig | None = None,
                                log_path: Path | None = None,
                                env: Mapping[str, str] | None = None,
                                cwd: Path | None = None,
                                while_running: Callable[[], None] | None = None,
                                poll_interval_s: float = POLL_INTERVAL_S) -> None:
    """Run the ranks to completion; raise `DistributedTrainingFailed` if the launcher fails.

    With `log_path`, the ranks' stdout and stderr go to that file (training logs are long; the
    worker's memory is not the place for them) and the error carries its last lines. Without it
    they go to the worker's own output. `while_running` is called every `poll_interval_s` while
    the ranks run. The worker's SIGTERM is not forwarded: a draining worker lets the ranks reach
    their checkpoint (see docs/deploying.md). Only if this function itself is interrupted (an
    exception from `while_running`, KeyboardInterrupt) are the ranks terminated, so none outlive it.
    """
    launch = launch or zero3_launch_config()
    require_distributed_backend(launch)
    argv = build_launch_command(num_gpus, train_request_path, launch=launch)
    run_env = dict(env) if env is not None else None
    if log_path is None:
        returncode = _run_ranks(argv, env=run_env, cwd=cwd, log=None, while_running=while_running,
                                poll_interval_s=poll_interval_s)
        tail = ""
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            returncode = _run_ranks(argv, env=run_env, cwd=cwd, log=log, while_running=while_running,
                                    poll_interval_s=poll_interval_s)
        tail = _tail(log_path)
    if returncode != 0:
        where = f"; last lines of {log_path}:\n{tail}" if tail else ""
        raise DistributedTrainingFailed(
            f"distributed training on {num_gpus} GPU(s) failed: accelerate launch exited with "
            f"status {returncode}{where}",
            data={"returncode": returncode, "num_gpus": num_gpus, "command": argv,
                  "log_path": str(log_path) if log_path else None},
        )


def _run_ranks(argv: list[str], *, env: dict[str, str] | None, cwd: Path | None, log: IO[bytes] | None,
               while_running: Callable[[], None] | None, poll_interval_s: float) -> int:
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log,
                               stderr=subprocess.STDOUT if log is not None else None)
    try:
        while True:
            try:
                return process.wait(timeout=poll_interval_s if while_running else None)
            except subprocess.TimeoutExpired:
                while_running()  # type: ignore[misc]  # only reached with a timeout, i.e. while_running set
    finally:
        if process.poll() is None:
            process.terminate()  # the launcher passes SIGTERM on to the ranks
            try:
                process.wait(timeout=_TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip()


class _StopRelay:
    """Polled while the ranks run: relays their progress, and passes the worker's stop on to them.

    The worker's `check_cancelled` raises on a cancel, a lost lease or a drain; the exception is
    kept and raised again once the ranks have stopped (a drain only after their checkpoint)."""

    def __init__(self, hooks: RoundHooks, progress: Callable[[float], None], control: TrainControl) -> None:
        self.hooks, self.progress, self.control = hooks, progress, control
        self.stop: BaseException | None = None
        self._last_fraction: float | None = None

    def poll(self) -> None:
        fraction = self.control.read_progress()
        if fraction is not None and fraction != self._last_fraction:
            self._last_fraction = fraction
            self.progress(fraction)
        if self.stop is not None:
            return
        try:
            self.hooks.check_cancelled()
        except DrainRequested as drain:
            self.stop = drain
            self.control.request_stop("drain")
        except Exception as stop:  # noqa: BLE001 — JobCancelled, LeaseLost, ...: raised again below
            self.stop = stop
            self.control.request_stop("cancel")

    def raise_requested_stop(self) -> None:
        if self.stop is not None:
            raise self.stop


def train_with_ranks(request: TrainRequest, *, num_gpus: int, request_path: Path, log_path: Path,
                     hooks: RoundHooks, progress: Callable[[float], None], launch: LaunchConfig | None = None,
                     poll_interval_s: float = POLL_INTERVAL_S) -> TrainResult:
    """The train stage on `num_gpus` ranks: the same TrainResult (and model in `request.out_dir`)
    as the in-process trainers, or the same exceptions (a drain after its checkpoint)."""
    control = request.control
    control.reset()  # no marker or outcome of an earlier attempt may reach these ranks
    request.write(request_path)
    relay = _StopRelay(hooks, progress, control)
    try:
        launch_distributed_training(num_gpus, request_path, launch=launch, log_path=log_path,
                                    while_running=relay.poll, poll_interval_s=poll_interval_s)
    except DistributedTrainingFailed as failure:
        relay.raise_requested_stop()  # what the worker asked for wins over how the ranks went down
        rank_error = control.first_rank_error()
        if rank_error is not None:
            raise rank_error from failure
        raise
    outcome = control.read_outcome()
    if outcome is not None and outcome.status == "completed" and outcome.result is not None:
        return outcome.result
    relay.raise_requested_stop()
    hooks.check_cancelled()  # the ranks saw $ALIGND_HOME/drain before the worker's next poll did
    status = outcome.status if outcome is not None else "no outcome"
    raise DistributedTrainingFailed(
        f"the training ranks exited without a trained model ({status}) although the worker did not stop them",
        data={"num_gpus": num_gpus, "status": status, "log_path": str(log_path)})
