"""Training across several GPUs of one worker: `accelerate launch` with DeepSpeed ZeRO-3.

A model too big for one GPU (full fine-tuning of 7B and up) trains with its parameters, gradients
and optimizer state sharded over every GPU the worker holds, one process per GPU. The worker
process itself stays a single process (Celery solo pool): it writes the round's training request
to a JSON file, runs the ranks as children with `launch_distributed_training`, and reads the result
the entry module (`workers.pipeline.train_entry`) leaves in the artifact directory.

The configuration lives in `deploy/`: `accelerate/zero3.yaml` (launcher) and
`deepspeed/zero3.json` (bf16, ZeRO stage 3, no offload, batch sizes filled in by the HF Trainer).
DeepSpeed is a GPU-image dependency; here it is only looked for, never imported.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from workers.errors import PipelineError

TRAIN_ENTRY_MODULE = "workers.pipeline.train_entry"
ACCELERATE_CONFIG = Path("accelerate") / "zero3.yaml"
DEEPSPEED_CONFIG = Path("deepspeed") / "zero3.json"
# The images keep the source tree at /app (editable install), so this is /app/deploy there too.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "deploy"
DISTRIBUTED_BACKENDS = ("accelerate", "deepspeed")
_LOG_TAIL_LINES = 40


class DistributedBackendMissing(PipelineError):
    """accelerate or DeepSpeed is not installed where the worker runs (only the GPU image has both)."""

    code = "distributed_backend_missing"


class DistributedTrainingFailed(PipelineError):
    """`accelerate launch` exited non-zero: a rank crashed, ran out of memory or lost its peers."""

    code = "distributed_training_failed"


def missing_distributed_backends() -> list[str]:
    """The launch dependencies this interpreter cannot import (without importing them)."""
    return [name for name in DISTRIBUTED_BACKENDS if importlib.util.find_spec(name) is None]


def require_distributed_backend() -> None:
    missing = missing_distributed_backends()
    if missing:
        raise DistributedBackendMissing(
            f"multi-GPU training needs {' and '.join(missing)}, which this worker does not have; "
            "run multi-GPU jobs on the GPU image (alignd worker target)",
            data={"missing": missing},
        )


def config_paths(config_dir: Path = DEFAULT_CONFIG_DIR) -> tuple[Path, Path]:
    """(accelerate YAML, DeepSpeed JSON) under `config_dir`, both required to exist."""
    accelerate_config = (config_dir / ACCELERATE_CONFIG).resolve()
    deepspeed_config = (config_dir / DEEPSPEED_CONFIG).resolve()
    for path in (accelerate_config, deepspeed_config):
        if not path.is_file():
            raise FileNotFoundError(f"distributed training config missing: {path}")
    return accelerate_config, deepspeed_config


def build_launch_command(num_gpus: int, train_request_path: Path, *,
                         config_dir: Path = DEFAULT_CONFIG_DIR) -> list[str]:
    """The argv of `accelerate launch ... -m workers.pipeline.train_entry <request.json>`.

    `accelerate launch` is run as `python -m accelerate.commands.launch` with this interpreter, so
    the ranks use the worker's own environment whatever PATH says. The DeepSpeed file is passed
    as an absolute path: the YAML's relative one only holds from the repository root.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    accelerate_config, deepspeed_config = config_paths(config_dir)
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config),
        "--deepspeed_config_file", str(deepspeed_config),
        "--num_processes", str(num_gpus),
        "--num_machines", "1",
        "-m", TRAIN_ENTRY_MODULE,
        str(Path(train_request_path).resolve()),
    ]


def launch_distributed_training(num_gpus: int, train_request_path: Path, *,
                                config_dir: Path = DEFAULT_CONFIG_DIR,
                                log_path: Path | None = None,
                                env: Mapping[str, str] | None = None,
                                cwd: Path | None = None) -> None:
    """Run the ranks to completion; raise `DistributedTrainingFailed` if the launcher fails.

    With `log_path`, the ranks' stdout and stderr go to that file (training logs are long; the
    worker's memory is not the place for them) and the error carries its last lines. Without it
    they go to the worker's own output. The worker's SIGTERM is not forwarded: a draining worker
    lets the ranks reach their checkpoint (see docs/deploying.md).
    """
    require_distributed_backend()
    argv = build_launch_command(num_gpus, train_request_path, config_dir=config_dir)
    run_env = dict(env) if env is not None else None
    if log_path is None:
        returncode = subprocess.run(argv, env=run_env, cwd=cwd, check=False).returncode
        tail = ""
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            returncode = subprocess.run(argv, env=run_env, cwd=cwd, stdout=log,
                                        stderr=subprocess.STDOUT, check=False).returncode
        tail = _tail(log_path)
    if returncode != 0:
        where = f"; last lines of {log_path}:\n{tail}" if tail else ""
        raise DistributedTrainingFailed(
            f"distributed training on {num_gpus} GPU(s) failed: accelerate launch exited with "
            f"status {returncode}{where}",
            data={"returncode": returncode, "num_gpus": num_gpus, "command": argv,
                  "log_path": str(log_path) if log_path else None},
        )


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines)).rstrip()
