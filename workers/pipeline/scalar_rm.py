"""Scalar reward models: any `AutoModelForSequenceClassification` with one label.

Conversations are rendered with the REWARD MODEL's chat template (Starling lesson: a reward model
scores text in the format it was trained on, not the policy's). Without a template, the prompt and
response are joined as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import ModelNotLoadable, RewardModelWrongKind
from workers.pipeline.loading import compute_device, load_tokenizer
from workers.pipeline.prompts import Messages, with_single_bos


@dataclass
class LoadedScalarRM:
    model: Any
    tokenizer: Any
    device: str
    max_length: int


def _check_kind(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelNotLoadable(f"reward model {model_dir.name!r} has no config.json")
    data = json.loads(config_path.read_text())
    if "ranker_type" in data:
        raise RewardModelWrongKind("this is an llm-blender PairRM; use reward_model.type 'pairrm'")
    architectures = data.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise RewardModelWrongKind(
            f"reward model type 'scalar' needs a sequence-classification model, got {architectures}")


def load_scalar_rm(location: str, *, max_length: int, is_local: bool = True) -> LoadedScalarRM:
    from transformers import AutoModelForSequenceClassification

    if is_local:
        _check_kind(Path(location))
    tokenizer = load_tokenizer(location)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            location, trust_remote_code=False, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelNotLoadable(f"cannot load scalar reward model: {exc}") from exc
    # A checkpoint without a trained head (e.g. a plain causal LM) gets a random one: refuse it.
    if any(k.startswith(("score.", "classifier.")) for k in info.get("missing_keys", [])):
        raise RewardModelWrongKind("the reward model has no trained classification head")
    if model.config.num_labels != 1:
        raise RewardModelWrongKind(f"a scalar reward model has one output, this one has {model.config.num_labels}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = compute_device()
    model.to(device).eval()
    return LoadedScalarRM(model=model, tokenizer=tokenizer, device=device, max_length=max_length)


def render_for_rm(tokenizer: Any, prompt: Messages, response: str) -> list[int]:
    conversation = list(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return with_single_bos(ids, tokenizer.bos_token_id) if tokenizer.bos_token_id in ids[:1] else ids
    text = "\n\n".join(m["content"] for m in conversation)
    return list(tokenizer(text)["input_ids"])


def scalar_rewards(rm: LoadedScalarRM, prompts: Sequence[Messages], responses: Sequence[str], *,
                   batch_size: int, on_batch: Callable[[], None] = lambda: None) -> list[float]:
    """One reward per (prompt, response), batched with right padding; long inputs keep their start."""
    import torch

    encoded = [render_for_rm(rm.tokenizer, p, r)[:rm.max_length] for p, r in zip(prompts, responses, strict=True)]
    pad = rm.tokenizer.pad_token_id
    rewards: list[float] = []
    for first in range(0, len(encoded), batch_size):
        on_batch()
        batch = encoded[first:first + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=rm.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=rm.device)
        with torch.inference_mode():
            logits = rm.model(input_ids=ids, attention_mask=mask).logits
        rewards.extend(logits[:, 0].float().cpu().tolist())
    return rewards
