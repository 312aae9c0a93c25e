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
from workers.pipeline.loading import compute_device, freeze, load_tokenizer, location_fingerprint, model_cache
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
    """The reward model at `location`, frozen and shared through the model cache (only read from)."""
    if is_local:
        _check_kind(Path(location))
    device = compute_device()
    model, tokenizer = model_cache.get(("scalar_rm", str(location), device), location_fingerprint(location),
                                       lambda: _load_scalar_rm(location, device), device=device)
    return LoadedScalarRM(model=model, tokenizer=tokenizer, device=device, max_length=max_length)


def _load_scalar_rm(location: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification

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
    return freeze(model.to(device)), tokenizer


def render_for_rm(tokenizer: Any, prompt: Messages, response: str) -> list[int]:
    return render_for_rm_batch(tokenizer, [prompt], [response])[0]


def render_for_rm_batch(tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each (prompt, response) conversation, tokenized in one batch call."""
    conversations = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses, strict=True)]
    if not conversations:
        return []
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
        bos = tokenizer.bos_token_id
        return [with_single_bos(list(ids), bos) if bos in ids[:1] else list(ids)
                for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    texts = ["\n\n".join(m["content"] for m in c) for c in conversations]
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


def scalar_rewards(rm: LoadedScalarRM, prompts: Sequence[Messages], responses: Sequence[str], *,
                   batch_size: int, on_batch: Callable[[], None] = lambda: None) -> list[float]:
    """One reward per (prompt, response), batched with right padding; long inputs keep their start."""
    import torch

    encoded = [ids[:rm.max_length] for ids in render_for_rm_batch(rm.tokenizer, prompts, responses)]
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
