"""Preference training on the round's pairs with TRL, LoRA (default) or full fine-tuning: DPO with
any TRL loss (ipo and sppo_hard included), or SPPO (`workers.pipeline.sppo`). Rejection sampling's
SFT (`workers.pipeline.sft`) shares the model setup below.

Iterative LoRA: the policy of round n is base + ONE cumulative adapter. Round 1 starts a fresh
adapter; round n > 1 loads round n-1's adapter as trainable and keeps training it, so the final
model is base + one adapter (what vLLM multi-LoRA serves). Full fine-tuning continues from round
n-1's full model.

Reference model: "round_start" is the policy as it was when the round began (round 1: the base);
"base" is always the original base model. For LoRA round 1 both are the base, obtained by TRL
disabling the adapter; otherwise an explicit frozen model is built (base + previous adapter, merged).

TRL 1.x dropped `max_prompt_length`; pairs whose prompt alone exceeds it are skipped here and
counted, so the job's setting keeps its meaning.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.errors import InvalidTrainingConfig, NoPairs
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import (
    compute_device,
    has_gpu,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    oom_as_domain_error,
    training_dtype,
)
from workers.pipeline.prompts import ensure_chat_template
from workers.pipeline.train_checkpoint import (
    TrainerCheckpoints,
    checkpoint_to_resume,
    run_fingerprint,
    stop_and_checkpoint_callback,
    whole_run_train_loss,
)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass(frozen=True)
class TrainConfig:
    method: Literal["lora", "full"] = "lora"
    learning_rate: float = 5e-7
    epochs: float = 1.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    max_prompt_length: int = 512
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.1
    gradient_checkpointing: bool = True
    seed: int = 0
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: Literal["round_start", "base"] = "round_start"
    lora: LoraSettings = field(default_factory=LoraSettings)
    algorithm: Literal["dpo", "sppo", "rejection_sampling"] = "dpo"
    length_normalize: bool = False  # average log-ratios per token: sigmoid -> TRL's sigmoid_norm; sppo

    def __post_init__(self) -> None:
        if self.algorithm not in ("dpo", "sppo", "rejection_sampling"):
            raise ValueError(f"unknown training algorithm {self.algorithm!r}")
        if self.method not in ("lora", "full"):
            raise ValueError(f"unknown training method {self.method!r}")
        if self.reference not in ("round_start", "base"):
            raise ValueError(f"unknown reference {self.reference!r}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")

    @property
    def trl_loss_type(self) -> str:
        """The TRL loss trained on (DPO): `length_normalize` turns sigmoid into TRL's sigmoid_norm, and
        TRL's ipo already averages per token."""
        if self.length_normalize and self.loss_type == "sigmoid":
            return "sigmoid_norm"
        return self.loss_type


@dataclass(frozen=True)
class StartingPolicy:
    """The policy at the start of the round: base (+ the cumulative adapter) or a full model dir."""

    base_location: str
    adapter_dir: Path | None = None
    full_model_dir: Path | None = None


@dataclass
class TrainResult:
    train_loss: float  # mean per optimizer step over the whole run, checkpointed steps included
    steps: int
    samples: int
    skipped_long_prompts: int
    wall_s: float  # this session's training loop (after a resume: the steps since the checkpoint)
    is_adapter: bool
    resumed_from_step: int = 0  # the drain checkpoint this run continued from (0: from the start)

    @property
    def samples_per_s(self) -> float:
        if self.wall_s <= 0 or self.steps <= 0:
            return 0.0
        return self.samples * (self.steps - self.resumed_from_step) / self.steps / self.wall_s


def trl_loss_types() -> set[str]:
    """The loss names TRL documents on `DPOConfig.loss_type` (so new TRL losses work unchanged)."""
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", "")
    return set(re.findall(r"'([a-z0-9_]+)'", help_text))


@dataclass
class TrainRun:
    """A finished `trainer.train()`: what `save_trained` needs besides the trainer."""

    trainer: Any
    output: Any
    wall_s: float
    resumed_from_step: int


def run_trainer(build_trainer: Callable[[list[Any]], Any], args: Any, config: TrainConfig, start: StartingPolicy,
                samples: int, hooks: RoundHooks, progress: Callable[[float], None]) -> TrainRun:
    """Build the trainer with the cancel/drain callback, resume from this run's drain checkpoint
    when one exists (`workers.pipeline.train_checkpoint`), and train. A drain raises
    `DrainRequested` after the checkpoint is saved; a cancel raises at once."""
    checkpoints = TrainerCheckpoints(Path(args.output_dir), run_fingerprint(
        config, start, samples=samples, world_size=args.world_size))
    callback = stop_and_checkpoint_callback(hooks, progress, checkpoints)
    trainer = build_trainer([callback])
    resume = checkpoint_to_resume(checkpoints, is_main_rank=args.should_save)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.perf_counter() - started
    callback.raise_if_drained()
    resumed_from = int(resume.name.rsplit("-", 1)[1]) if resume else 0
    return TrainRun(trainer=trainer, output=output, wall_s=wall, resumed_from_step=resumed_from)


def train_for_algorithm(config: TrainConfig, start: StartingPolicy, data: Any, out_dir: Path, scratch_dir: Path,
                        hooks: RoundHooks | None = None, progress: Any = None) -> TrainResult:
    """The trainer of `config.algorithm`: SFT for rejection sampling, else DPO/SPPO."""
    if config.algorithm == "rejection_sampling":
        from workers.pipeline.sft import train_sft

        return train_sft(config, start, data, out_dir, scratch_dir, hooks, progress=progress)
    return train_dpo(config, start, data, out_dir, scratch_dir, hooks, progress=progress)


def build_models(config: TrainConfig, start: StartingPolicy, dtype: Any, device: str) -> tuple[Any, Any, Any]:
    """(policy, ref_model or None, peft_config or None) as described in the module docstring; no
    reference for rejection sampling."""
    needs_reference = config.algorithm != "rejection_sampling"
    if config.method == "full":
        policy = load_causal_lm(str(start.full_model_dir or start.base_location), dtype=dtype, device=device)
        if not needs_reference:
            return policy, None, None
        ref_location = start.base_location if config.reference == "base" else str(
            start.full_model_dir or start.base_location)
        ref = load_causal_lm(ref_location, dtype=dtype, device=device)
        return policy, _frozen(ref), None
    if start.adapter_dir is None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM", bias="none")
        return load_causal_lm(start.base_location, dtype=dtype, device=device), None, peft_config
    policy = load_policy(start.base_location, start.adapter_dir, dtype=dtype, device=device, merge=False,
                         trainable=True)
    if not needs_reference:
        return policy, None, None
    ref_adapter = None if config.reference == "base" else start.adapter_dir
    ref = load_policy(start.base_location, ref_adapter, dtype=dtype, device=device, merge=True)
    return policy, _frozen(ref), None


def _frozen(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def drop_long_prompts(dataset: Any, tokenizer: Any, max_prompt_length: int) -> tuple[Any, int]:
    """The rows whose prompt (chat template + generation prompt) fits in `max_prompt_length` tokens,
    and how many were dropped. All prompts are rendered in one batch call rather than a
    `Dataset.filter` pass, and the dataset comes back unchanged when every prompt fits."""
    if len(dataset) == 0:
        return dataset, 0
    ids = tokenizer.apply_chat_template(list(dataset["prompt"]), tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    keep = [i for i, row in enumerate(ids) if len(row) <= max_prompt_length]
    if len(keep) == len(dataset):
        return dataset, 0
    return dataset.select(keep), len(dataset) - len(keep)


def train_dpo(config: TrainConfig, start: StartingPolicy, pairs: Any, out_dir: Path, scratch_dir: Path,
              hooks: RoundHooks | None = None, progress: Any = None) -> TrainResult:
    """Train on `pairs` (a datasets.Dataset) and save the adapter or full model + tokenizer to `out_dir`."""
    from trl import DPOConfig, DPOTrainer

    hooks = hooks or RoundHooks()
    progress = progress or (lambda fraction: None)
    if config.algorithm == "dpo" and config.trl_loss_type not in trl_loss_types():
        raise InvalidTrainingConfig(f"unknown DPO loss type {config.loss_type!r}; TRL knows "
                                    f"{sorted(trl_loss_types())}")
    tokenizer_source = str(start.full_model_dir or start.base_location)
    tokenizer = load_tokenizer(tokenizer_source)
    ensure_chat_template(tokenizer)  # TRL renders conversational rows with the chat template
    pairs, skipped = drop_long_prompts(pairs, tokenizer, config.max_prompt_length)
    if len(pairs) == 0:
        raise NoPairs(f"every pair's prompt is longer than max_prompt_length={config.max_prompt_length}")
    on_gpu = has_gpu()
    dtype = training_dtype()
    device = compute_device()
    args = DPOConfig(
        **common_training_args(config, scratch_dir, on_gpu=on_gpu, dtype=dtype), beta=config.beta,
        loss_type=[config.trl_loss_type if config.algorithm == "dpo" else "sigmoid"],
        label_smoothing=config.label_smoothing, max_length=config.max_length,
    )
    trainer_kwargs: dict[str, Any] = {}
    trainer_class: Any = DPOTrainer
    if config.algorithm == "sppo":
        from workers.pipeline.sppo import SPPOTrainer

        trainer_class = SPPOTrainer
        trainer_kwargs["length_normalize"] = config.length_normalize
    with oom_as_domain_error():
        policy, ref, peft_config = build_models(config, start, dtype, device)

        def build_trainer(callbacks: list[Any]) -> Any:
            return trainer_class(model=policy, ref_model=ref, args=args, train_dataset=pairs,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                                 **trainer_kwargs)

        try:
            run = run_trainer(build_trainer, args, config, start, len(pairs), hooks, progress)
        except ValueError as exc:
            if "loss type" in str(exc).lower():
                raise InvalidTrainingConfig(str(exc)) from exc
            raise
        return save_trained(run, config, tokenizer_source, out_dir, samples=len(pairs), skipped=skipped)


def common_training_args(config: TrainConfig, scratch_dir: Path, *, on_gpu: bool, dtype: Any) -> dict[str, Any]:
    """The transformers TrainingArguments every trainer here shares."""
    return dict(
        output_dir=str(scratch_dir), report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, num_train_epochs=config.epochs,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio, seed=config.seed, data_seed=config.seed,
        bf16=on_gpu and dtype is not None and str(dtype) == "torch.bfloat16", fp16=False,
        gradient_checkpointing=on_gpu and config.gradient_checkpointing, use_cpu=not on_gpu,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=True,
    )


def gathered_state_dict(trainer: Any) -> dict[str, Any] | None:
    """Under DeepSpeed ZeRO-3 every rank holds a shard: gather the 16-bit weights (a collective,
    so every rank calls this), as `Trainer.save_model` does. None when the model is whole."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    import inspect

    from accelerate.utils import is_peft_model

    engine = trainer.deepspeed
    zero3 = engine.config.get("zero_optimization", {}).get("stage") == 3
    if zero3 and is_peft_model(trainer.model) and "exclude_frozen_parameters" in inspect.signature(
            engine.save_checkpoint).parameters:
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)  # the adapter only
    return trainer.accelerator.get_state_dict(engine)


def save_trained(run: TrainRun, config: TrainConfig, tokenizer_source: str, out_dir: Path, *, samples: int,
                 skipped: int) -> TrainResult:
    """The main rank writes the adapter or full model (gathered from the ZeRO-3 shards when sharded)
    and the tokenizer as shipped; every rank returns the same result."""
    trainer = run.trainer
    state_dict = gathered_state_dict(trainer)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        load_tokenizer(tokenizer_source).save_pretrained(str(out_dir))  # as shipped, not our in-memory edits
    trainer.accelerator.wait_for_everyone()
    return TrainResult(train_loss=whole_run_train_loss(trainer.state.log_history, float(run.output.training_loss)),
                       steps=int(run.output.global_step), samples=int(samples * config.epochs),
                       skipped_long_prompts=skipped, wall_s=run.wall_s, is_adapter=config.method == "lora",
                       resumed_from_step=run.resumed_from_step)
