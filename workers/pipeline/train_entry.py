"""`python -m workers.pipeline.train_entry <train_request.json>`: one rank of a multi-GPU train stage.

`accelerate launch` (`workers.distributed`) starts one process per GPU. Every rank runs the same
trainer as the in-process path (`train_for_algorithm`: DPO, SPPO or SFT) on the request's data;
under ZeRO-3 the Trainer shards the model over the ranks. Only rank 0 writes: the model (gathered
from the shards) and tokenizer, progress, and `outcome.json` with the TrainResult last.

Stopping: the ranks cannot see the worker's memory, so at each optimizer step rank 0 reads the stop
markers of the request's control directory (`TrainControl`) and `$ALIGND_HOME/drain`, and
broadcasts what it found, so every rank stops at the same step. A drain makes the Trainer save its
checkpoint (each rank writes its part) before the ranks exit 0 with outcome `drained`; a cancel
exits 0 with outcome `cancelled` and no checkpoint. A pipeline error (e.g. `gpu_out_of_memory`) is
written to the control directory and the rank exits non-zero, which makes the launcher stop the
others.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from workers.errors import JobCancelled, PipelineError
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.train import TrainResult, train_for_algorithm
from workers.pipeline.train_checkpoint import DrainRequested
from workers.pipeline.train_request import OutcomeStatus, TrainControl, TrainRequest

T = TypeVar("T")


def rank_index() -> int:
    """This process's rank; -1 before the process group exists (the Trainer sets it up)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return -1


def is_main_rank() -> bool:
    return rank_index() in (0, -1)


def broadcast_from_main_rank(read: Callable[[], T]) -> T:
    """`read()` on rank 0, its value on every rank (every rank must call this at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return read()
    box: list[Any] = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_hooks(control: TrainControl, drain_files: tuple[Path, ...]) -> RoundHooks:
    def check_cancelled() -> None:
        kind = broadcast_from_main_rank(lambda: control.stop_requested(drain_files))
        if kind == "cancel":
            raise JobCancelled("the worker stopped the training ranks")
        if kind == "drain":
            raise DrainRequested("the worker is draining")

    return RoundHooks(check_cancelled=check_cancelled)


def rank_progress(control: TrainControl) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        if is_main_rank():
            control.write_progress(fraction)

    return report


def load_training_data(pairs_dir: Path) -> Any:
    """The round's pairs, in memory: ranks never write cache files into the committed artifact."""
    from datasets import load_from_disk

    return load_from_disk(str(pairs_dir), keep_in_memory=True)


def run_request(request: TrainRequest, drain_files: tuple[Path, ...] = ()) -> OutcomeStatus:
    control = request.control
    result: TrainResult | None = None
    status: OutcomeStatus
    try:
        result = train_for_algorithm(request.config, request.start, load_training_data(request.pairs_dir),
                                     request.out_dir, request.scratch_dir, rank_hooks(control, drain_files),
                                     progress=rank_progress(control))
        status = "completed"
    except DrainRequested:
        status = "drained"  # the checkpoint is saved (train_checkpoint)
    except JobCancelled:
        status = "cancelled"
    if is_main_rank():
        control.write_outcome(status, result)
    return status


def close_process_group() -> None:
    """Wait for every rank (rank 0 writes the model and outcome last), then tear the group down. A
    rank that exits with the group alive can abort in gloo's threads at interpreter exit
    ("terminate called without an active exception", SIGABRT), failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.pipeline.train_entry <train_request.json>", file=sys.stderr)
        return 2
    request = TrainRequest.read(Path(args[0]))
    from workers.liveness import drain_file  # the preStop hook's file, seen by every process of the pod

    try:
        run_request(request, drain_files=(drain_file(),))
    except PipelineError as error:
        request.control.write_rank_error(rank_index(), error)
        raise  # no barrier: the launcher stops the other ranks
    close_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
