"""Drain checkpointing inside training (workers/pipeline/train_checkpoint.py), in process on the tiny
model: a drain after step k saves the HF Trainer checkpoint at step k and raises; the next run
resumes there and ends where an uninterrupted run ends. A cancel saves nothing, and half-written
or foreign checkpoints are never resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workers.errors import JobCancelled
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.pair import PairingConfig
from workers.pipeline.train import StartingPolicy, TrainConfig, train_dpo
from workers.pipeline.train_checkpoint import COMPLETE_MARKER, DrainRequested
from workers.round_adapter import WorkerDraining
from workers.tiny_models import synthetic_prompts

TOTAL_STEPS = 8  # 8 pairs, batch 2, 2 epochs
DRAIN_AT = 3


def config() -> TrainConfig:
    return TrainConfig(learning_rate=1e-2, epochs=2, batch_size=2, max_length=64, max_prompt_length=32,
                       warmup_ratio=0.0, lr_scheduler_type="linear")


class StopAfter:
    """Hooks that raise `stop` at the first check once `step` optimizer steps are done, and record
    every step the trainer reported."""

    def __init__(self, step: int | None, stop: Exception | None = None) -> None:
        self.step, self.stop, self.steps_seen = step, stop, []

    def progress(self, fraction: float) -> None:
        self.steps_seen.append(round(fraction * TOTAL_STEPS))

    def check(self) -> None:
        if self.step is not None and self.steps_seen and self.steps_seen[-1] >= self.step:
            raise self.stop

    def hooks(self) -> RoundHooks:
        return RoundHooks(check_cancelled=self.check)


def train(tiny_models, pairs, out: Path, scratch: Path, stopper: StopAfter):
    out.mkdir(parents=True, exist_ok=True)
    return train_dpo(config(), StartingPolicy(str(tiny_models.root / tiny_models.policy)), pairs, out, scratch,
                     stopper.hooks(), progress=stopper.progress)


def adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "model"
    result = train(tiny_models, pairs, out, out.parent / "scratch", StopAfter(None))
    assert result.steps == TOTAL_STEPS and result.resumed_from_step == 0
    return result, adapter(out)


def test_drain_checkpoints_at_the_step_and_the_rerun_resumes_there(tiny_models, pairs, uninterrupted, tmp_path):
    scratch = tmp_path / "trainer-scratch"
    drained = StopAfter(DRAIN_AT, WorkerDraining("the worker is shutting down"))
    with pytest.raises(WorkerDraining):
        train(tiny_models, pairs, tmp_path / "attempt-1", scratch, drained)
    assert drained.steps_seen == [1, 2, 3]
    assert not (tmp_path / "attempt-1" / "adapter_model.safetensors").exists(), "no model from a drained run"
    checkpoint = scratch / f"checkpoint-{DRAIN_AT}"
    assert [p.name for p in scratch.glob("checkpoint-*")] == [checkpoint.name]
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 COMPLETE_MARKER):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == DRAIN_AT and state["max_steps"] == TOTAL_STEPS
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]

    resumed = StopAfter(None)
    result = train(tiny_models, pairs, tmp_path / "attempt-2", scratch, resumed)
    assert resumed.steps_seen == [4, 5, 6, 7, 8], "continues after the checkpoint, not from step 1"
    whole, whole_adapter = uninterrupted
    assert result.steps == whole.steps == TOTAL_STEPS
    assert result.resumed_from_step == DRAIN_AT and result.samples == whole.samples
    # The checkpoint carried the optimizer, scheduler, RNG and data position: same loss, same adapter.
    assert result.train_loss == pytest.approx(whole.train_loss, rel=1e-4)
    resumed_adapter = adapter(tmp_path / "attempt-2")
    assert set(resumed_adapter) == set(whole_adapter)
    assert all(torch.allclose(resumed_adapter[k], whole_adapter[k], atol=1e-5) for k in whole_adapter)


def test_cancel_stops_without_a_checkpoint(tiny_models, pairs, tmp_path):
    scratch = tmp_path / "trainer-scratch"
    cancelled = StopAfter(DRAIN_AT, JobCancelled())
    with pytest.raises(JobCancelled):
        train(tiny_models, pairs, tmp_path / "m", scratch, cancelled)
    assert cancelled.steps_seen == [1, 2, 3]
    assert not list(scratch.glob("checkpoint-*"))


def test_a_drain_at_the_last_step_finishes_instead(tiny_models, pairs, tmp_path):
    """Saving the model is cheaper than a checkpoint the next worker would only finish from."""
    stopper = StopAfter(TOTAL_STEPS, DrainRequested("draining"))
    result = train(tiny_models, pairs, tmp_path / "m", tmp_path / "scratch", stopper)
    assert result.steps == TOTAL_STEPS and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "scratch").glob("checkpoint-*"))


def test_half_written_and_foreign_checkpoints_are_not_resumed(tiny_models, pairs, tmp_path):
    scratch = tmp_path / "trainer-scratch"
    with pytest.raises(DrainRequested):
        train(tiny_models, pairs, tmp_path / "a", scratch, StopAfter(2, DrainRequested("draining")))
    good = scratch / "checkpoint-2"
    # A save killed half-way (no marker) at a later step, with junk where the weights would be ...
    half = scratch / "checkpoint-5"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"half a file")
    # ... and a complete checkpoint of another run (another config or data: another fingerprint).
    foreign = scratch / "checkpoint-6"
    foreign.mkdir()
    (foreign / COMPLETE_MARKER).write_text(json.dumps({"fingerprint": "another-run", "step": 6}))

    resumed = StopAfter(None)
    result = train(tiny_models, pairs, tmp_path / "b", scratch, resumed)
    assert result.resumed_from_step == 2 and resumed.steps_seen[0] == 3 and result.steps == TOTAL_STEPS
    assert not half.exists() and not foreign.exists() and good.is_dir()


def test_a_checkpoint_missing_its_marker_is_a_fresh_start(tiny_models, pairs, tmp_path):
    scratch = tmp_path / "trainer-scratch"
    with pytest.raises(DrainRequested):
        train(tiny_models, pairs, tmp_path / "a", scratch, StopAfter(2, DrainRequested("draining")))
    (scratch / "checkpoint-2" / COMPLETE_MARKER).unlink()  # killed just before the marker was written
    resumed = StopAfter(None)
    result = train(tiny_models, pairs, tmp_path / "b", scratch, resumed)
    assert result.resumed_from_step == 0 and resumed.steps_seen[0] == 1 and result.steps == TOTAL_STEPS


def test_rejection_sampling_sft_drains_and_resumes_the_same_way(tiny_models, tmp_path):
    from datasets import Dataset

    from workers.pipeline.pair import select_best
    from workers.pipeline.sft import train_sft

    prompts = synthetic_prompts(8, seed=3)
    best = select_best(prompts, [["kind warm calm gentle", "the old red clock"] for _ in prompts],
                       [[1.0, 0.0]] * len(prompts), PairingConfig())
    data = Dataset.from_list(best.rows)
    sft_config = TrainConfig(algorithm="rejection_sampling", learning_rate=1e-2, epochs=2, batch_size=2, max_length=64,
                             max_prompt_length=32, warmup_ratio=0.0, lr_scheduler_type="constant")
    start, scratch = StartingPolicy(str(tiny_models.root / tiny_models.policy)), tmp_path / "scratch"
    drained = StopAfter(2, WorkerDraining("the worker is shutting down"))
    with pytest.raises(WorkerDraining):
        train_sft(sft_config, start, data, tmp_path / "a", scratch, drained.hooks(), progress=drained.progress)
    assert [p.name for p in scratch.glob("checkpoint-*")] == ["checkpoint-2"]
    resumed = StopAfter(None)
    (tmp_path / "b").mkdir()
    result = train_sft(sft_config, start, data, tmp_path / "b", scratch, resumed.hooks(), progress=resumed.progress)
    assert result.resumed_from_step == 2 and resumed.steps_seen == [3, 4, 5, 6, 7, 8]
    assert result.steps == TOTAL_STEPS and (tmp_path / "b" / "adapter_model.safetensors").is_file()
