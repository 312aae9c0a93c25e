"""The multi-GPU train stage for real, on two CPU ranks: `accelerate launch` (torchrun over gloo, the
test-only `multi_cpu/accelerate.yaml`) runs `workers.pipeline.train_entry` on the tiny model. The
production launch (ZeRO-3 files, DeepSpeed required) is checked in test_distributed.py; only the
accelerate YAML differs here, everything after it (entry module, request, control files, result,
model saving, drain and cancel) is the production code path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.schemas.job_spec import JobSpec
from workers import distributed
from workers.distributed import LaunchConfig, train_with_ranks
from workers.errors import JobCancelled, PipelineError
from workers.pipeline import artifacts
from workers.pipeline import round as round_module
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.pair import PairingConfig, build_pairs
from workers.pipeline.train import LoraSettings, StartingPolicy, TrainConfig, TrainResult
from workers.pipeline.train_checkpoint import COMPLETE_MARKER, DrainRequested
from workers.pipeline.train_request import TrainControl, TrainRequest
from workers.tiny_models import synthetic_prompts

CPU_LAUNCH = LaunchConfig(accelerate_config=Path(__file__).resolve().parent / "multi_cpu" / "accelerate.yaml")
RANKS = 2


def save_pairs_dataset(directory: Path, n: int = 8) -> Path:
    from datasets import Dataset

    prompts = synthetic_prompts(n, seed=2)
    candidates = [["kind warm calm gentle", "the old red clock"] for _ in prompts]
    rows = build_pairs(prompts, candidates, [[1.0, 0.0]] * len(prompts), PairingConfig()).rows
    Dataset.from_list(rows).save_to_disk(str(directory))
    return directory


def train_config(**overrides) -> TrainConfig:
    base = dict(learning_rate=1e-2, epochs=1, batch_size=2, max_length=64, max_prompt_length=32,
                warmup_ratio=0.0, lr_scheduler_type="constant")
    return TrainConfig(**{**base, **overrides})


def make_request(tmp_path: Path, tiny_models, config: TrainConfig, attempt: str = "a") -> TrainRequest:
    pairs = tmp_path / "pairs"
    if not pairs.exists():
        save_pairs_dataset(pairs)
    out = tmp_path / f"model.tmp-{attempt}"
    out.mkdir()
    return TrainRequest(config=config, start=StartingPolicy(str(tiny_models.root / tiny_models.policy)),
                        pairs_dir=pairs, out_dir=out, scratch_dir=tmp_path / "trainer-scratch",
                        control_dir=tmp_path / "train-control")


def run_ranks(request: TrainRequest, tmp_path: Path, hooks: RoundHooks | None = None, progress=None,
              poll_interval_s: float = 0.2) -> TrainResult:
    return train_with_ranks(request, num_gpus=RANKS, request_path=tmp_path / "train_request.json",
                            log_path=tmp_path / "train.log", hooks=hooks or RoundHooks(),
                            progress=progress or (lambda fraction: None), launch=CPU_LAUNCH,
                            poll_interval_s=poll_interval_s)


# ---- the request and control files ----------------------------------------------------------------

def test_the_train_request_round_trips_through_json(tmp_path: Path) -> None:
    config = TrainConfig(method="full", learning_rate=3e-6, epochs=2.5, batch_size=4, gradient_accumulation_steps=2,
                         max_length=256, max_prompt_length=128, lr_scheduler_type="linear", warmup_ratio=0.05,
                         gradient_checkpointing=False, seed=7, beta=0.2, loss_type="ipo", label_smoothing=0.1,
                         reference="base", lora=LoraSettings(r=8, alpha=32, dropout=0.05, target_modules=["q_proj"]),
                         algorithm="sppo", length_normalize=True)
    request = TrainRequest(config=config,
                           start=StartingPolicy("/models/base", adapter_dir=tmp_path / "round-1" / "model"),
                           pairs_dir=tmp_path / "pairs", out_dir=tmp_path / "model.tmp-x",
                           scratch_dir=tmp_path / "scratch", control_dir=tmp_path / "control")
    request.write(tmp_path / "train_request.json")
    on_disk = json.loads((tmp_path / "train_request.json").read_text())
    assert on_disk["algorithm"] == "sppo" and on_disk["config"]["lora"]["target_modules"] == ["q_proj"]
    assert TrainRequest.read(tmp_path / "train_request.json") == request
    full = TrainRequest(config=TrainConfig(), start=StartingPolicy("base", full_model_dir=tmp_path / "m"),
                        pairs_dir=tmp_path, out_dir=tmp_path, scratch_dir=tmp_path, control_dir=tmp_path)
    assert TrainRequest.from_json(json.loads(json.dumps(full.to_json()))) == full


def test_control_files_carry_stops_outcomes_and_rank_errors(tmp_path: Path) -> None:
    control = TrainControl(tmp_path / "control")
    control.reset()
    assert control.stop_requested() is None and control.read_outcome() is None
    home_drain = tmp_path / "home" / "drain"
    home_drain.parent.mkdir()
    home_drain.touch()
    assert control.stop_requested((home_drain,)) == "drain"
    control.request_stop("cancel")
    assert control.stop_requested((home_drain,)) == "cancel", "a cancel never checkpoints"
    result = TrainResult(train_loss=0.5, steps=4, samples=8, skipped_long_prompts=1, wall_s=2.0, is_adapter=True,
                         resumed_from_step=2)
    control.write_outcome("completed", result)
    assert control.read_outcome().result == result
    control.write_rank_error(1, PipelineError("CUDA out of memory", code="gpu_out_of_memory", data={"x": Path("/p")}))
    error = control.first_rank_error()
    assert error.code == "gpu_out_of_memory" and error.data == {"x": "/p"}
    control.reset()
    assert not any(control.directory.iterdir()), "no marker of an earlier attempt survives a launch"


# ---- two ranks for real ---------------------------------------------------------------------------

def test_two_ranks_train_and_save_what_the_single_process_path_saves(tiny_models, tmp_path: Path) -> None:
    from workers.pipeline.loading import load_causal_lm, load_policy

    request = make_request(tmp_path, tiny_models, train_config())
    reported: list[float] = []
    result = run_ranks(request, tmp_path, progress=reported.append)

    # 8 pairs, 2 per rank and step, 2 ranks: 2 optimizer steps.
    assert result.steps == 2 and result.samples == 8 and result.is_adapter and result.resumed_from_step == 0
    assert 0 < result.train_loss < 0.6932 and result.wall_s > 0
    outcome = json.loads((request.control_dir / "outcome.json").read_text())
    assert outcome["status"] == "completed" and TrainResult(**outcome["result"]) == result
    assert reported and reported[-1] == 1.0
    assert TrainRequest.read(tmp_path / "train_request.json") == request

    out = request.out_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "training_args.bin").exists(), "no pickles in a model directory"
    base = load_causal_lm(request.start.base_location, device="cpu").state_dict()
    trained = load_policy(request.start.base_location, out, device="cpu", merge=True).state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(base[k], trained[k]) for k in base), "the adapter changed the model"


def test_a_drain_in_the_ranks_checkpoints_and_the_next_launch_resumes(tiny_models, tmp_path: Path) -> None:
    config = train_config(batch_size=1, epochs=4)  # 8 pairs, 1 per rank and step: 4 steps an epoch, 16 in all
    total = 16
    seen: list[int] = []

    def drain_after_the_first_step() -> None:
        if seen and seen[-1] >= 1:
            raise DrainRequested("the worker is shutting down")

    first = make_request(tmp_path, tiny_models, config, attempt="1")
    with pytest.raises(DrainRequested):
        run_ranks(first, tmp_path, hooks=RoundHooks(check_cancelled=drain_after_the_first_step),
                  progress=lambda f: seen.append(round(f * total)), poll_interval_s=0.02)
    assert json.loads((first.control_dir / "outcome.json").read_text())["status"] == "drained"
    (checkpoint,) = first.scratch_dir.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < total, "stopped at an optimizer step after the drain, before the end"
    assert (checkpoint / COMPLETE_MARKER).is_file() and (checkpoint / "optimizer.pt").is_file()
    assert {f"rng_state_{rank}.pth" for rank in range(RANKS)} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert not (first.out_dir / "adapter_model.safetensors").exists()

    second = make_request(tmp_path, tiny_models, config, attempt="2")
    resumed_steps: list[int] = []
    result = run_ranks(second, tmp_path, progress=lambda f: resumed_steps.append(round(f * total)))
    assert result.resumed_from_step == step and result.steps == total
    assert resumed_steps and min(resumed_steps) > step, "the ranks continued from the checkpoint"
    assert (second.out_dir / "adapter_model.safetensors").is_file()


def test_a_cancel_stops_the_ranks_without_a_checkpoint(tiny_models, tmp_path: Path) -> None:
    seen: list[float] = []

    def cancel_after_the_first_step() -> None:
        if seen:
            raise JobCancelled("the job was cancelled")

    request = make_request(tmp_path, tiny_models, train_config(batch_size=1, epochs=4))
    with pytest.raises(JobCancelled):
        run_ranks(request, tmp_path, hooks=RoundHooks(check_cancelled=cancel_after_the_first_step),
                  progress=seen.append, poll_interval_s=0.02)
    assert json.loads((request.control_dir / "outcome.json").read_text())["status"] == "cancelled"
    assert not list(request.scratch_dir.glob("checkpoint-*"))


def test_a_pipeline_error_in_the_ranks_keeps_its_code(tiny_models, tmp_path: Path) -> None:
    request = make_request(tmp_path, tiny_models, train_config(max_length=32, max_prompt_length=8))
    with pytest.raises(PipelineError) as caught:
        run_ranks(request, tmp_path)
    assert caught.value.code == "no_pairs", caught.value.message
    assert "workers.errors.NoPairs" in (tmp_path / "train.log").read_text()
    assert (request.control_dir / "rank-before-init-error.json").is_file(), "failed before the process group"


# ---- the round's train stage ------------------------------------------------------------------------

def test_the_round_trains_on_ranks_when_the_job_asks_for_several_gpus(tiny_models, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "zero3_launch_config", lambda: CPU_LAUNCH)  # CPU ranks, no DeepSpeed here

    def not_in_process(*args, **kwargs):
        raise AssertionError("num_gpus > 1 must not train in the worker process")

    monkeypatch.setattr(round_module, "train_for_algorithm", not_in_process)
    spec = JobSpec.model_validate(dict(
        base_model=tiny_models.policy, prompt_set="ps", rounds=1, reward_model={"type": "scalar",
                                                                                 "model": tiny_models.scalar_rm},
        training={"learning_rate": 1e-2, "epochs": 1, "batch_size": 2, "max_length": 64, "max_prompt_length": 32,
                  "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "num_gpus": RANKS}))
    ctx = round_module.RoundContext(job_id="job-dist", round_index=1, spec=spec, prompts=synthetic_prompts(8),
                                    artifact_root=tmp_path, model_root=tiny_models.root)
    runner = round_module._RoundRunner(ctx)
    save_pairs_dataset(runner.paths.pairs)
    runner.train(round_module._starting_policy(ctx))

    paths = runner.paths
    stats = artifacts.read_json(paths.stage_stats("train"))
    assert stats["train_steps"] == 2 and stats["model_is_adapter"] and stats["train_resumed_from_step"] == 0
    assert runner.metrics["train_steps"] == 2 and "train_wall_s" in runner.metrics
    assert (paths.model / "adapter_model.safetensors").is_file()
    request = TrainRequest.read(paths.round_dir / "train_request.json")
    assert request.pairs_dir == paths.pairs and request.scratch_dir == paths.trainer_scratch
    assert request.config == round_module.train_config(spec)
    assert (paths.round_dir / "train.log").is_file()
    assert json.loads((request.control_dir / "outcome.json").read_text())["status"] == "completed"
    assert not paths.trainer_scratch.exists(), "checkpoints go once the model is committed"
    assert not list(paths.round_dir.glob("model.tmp-*"))
