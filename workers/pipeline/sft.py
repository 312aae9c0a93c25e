"""Rejection sampling's training step (Merlinite, seeds/002): SFT on each prompt's best answer with
TRL's SFTTrainer, the loss on the answer tokens only.

The policy is set up exactly as for DPO (`train.build_models`): round 1 starts a LoRA adapter on
the base, later rounds keep training the same cumulative adapter (or the previous full model).
There is no reference model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.errors import NoPairs
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import compute_device, has_gpu, load_tokenizer, oom_as_domain_error, training_dtype
from workers.pipeline.prompts import ensure_chat_template
from workers.pipeline.train import (
    StartingPolicy,
    TrainConfig,
    TrainResult,
    build_models,
    common_training_args,
    drop_long_prompts,
    run_trainer,
    save_trained,
)


def train_sft(config: TrainConfig, start: StartingPolicy, best: Any, out_dir: Path, scratch_dir: Path,
              hooks: RoundHooks | None = None, progress: Any = None) -> TrainResult:
    """Fine-tune on `best` (a datasets.Dataset of prompt/completion rows) and save like `train_dpo`."""
    from trl import SFTConfig, SFTTrainer

    hooks = hooks or RoundHooks()
    progress = progress or (lambda fraction: None)
    tokenizer_source = str(start.full_model_dir or start.base_location)
    tokenizer = load_tokenizer(tokenizer_source)
    ensure_chat_template(tokenizer)
    best, skipped = drop_long_prompts(best, tokenizer, config.max_prompt_length)
    if len(best) == 0:
        raise NoPairs(f"every prompt is longer than max_prompt_length={config.max_prompt_length}")
    on_gpu = has_gpu()
    dtype = training_dtype()
    args = SFTConfig(**common_training_args(config, scratch_dir, on_gpu=on_gpu, dtype=dtype),
                     max_length=config.max_length, completion_only_loss=True, packing=False)
    with oom_as_domain_error():
        policy, _reference, peft_config = build_models(config, start, dtype, compute_device())

        def build_trainer(callbacks: list[Any]) -> Any:
            return SFTTrainer(model=policy, args=args, train_dataset=best.select_columns(["prompt", "completion"]),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)

        run = run_trainer(build_trainer, args, config, start, len(best), hooks, progress)
        return save_trained(run, config, tokenizer_source, out_dir, samples=len(best), skipped=skipped)
