"""PairRM through llm-blender's own classes, loaded safely and offline-capable.

llm-blender's `Blender.loadranker` downloads the DeBERTa backbone *weights* from the hub and then
`torch.load`s the checkpoint without `weights_only`. We keep its classes (`RankerConfig`,
`CrossCompareReranker`, `CrossCompareCollator`) and do the loading ourselves:

- `ranker_config.json` (or `config.json` when it holds a `ranker_type`) is the `RankerConfig`;
- the backbone is built from a config only: `backbone_config.json` when present (our tiny models),
  else the config of `ranker_config.model_name` (e.g. `microsoft/deberta-v3-large`);
- weights come from `model.safetensors`, or `pytorch_model.bin` read with `weights_only=True`.

`pairwise_logits` scores every ordered pair (i left, j right) in one batched forward per chunk;
`cancel_position_bias` averages the two orders into an antisymmetric logit matrix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.errors import ModelNotLoadable, RewardModelWrongKind, TokenizerMissing

PAIRRM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def import_llm_blender() -> None:
    """Make llm-blender 0.0.2 importable on transformers 5 (it imports a constant removed there)."""
    import transformers.utils.hub as hub

    if not hasattr(hub, "TRANSFORMERS_CACHE"):
        from huggingface_hub.constants import HF_HUB_CACHE

        hub.TRANSFORMERS_CACHE = HF_HUB_CACHE


def read_ranker_config(model_dir: Path) -> dict[str, Any]:
    """The RankerConfig dict of a PairRM directory; anything else is the wrong kind of model."""
    for name in ("ranker_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ModelNotLoadable(f"cannot read {name} of the reward model: {exc}") from exc
            if isinstance(data, dict) and "ranker_type" in data:
                if data["ranker_type"] != "pairranker":
                    raise RewardModelWrongKind(
                        f"reward model is an llm-blender {data['ranker_type']!r}, not a pairranker")
                return data
    raise RewardModelWrongKind("reward model type 'pairrm' needs an llm-blender PairRM directory "
                               "(ranker_config.json with ranker_type 'pairranker')")


def _restore_batch_encode_plus(tokenizer: Any) -> None:
    """llm-blender's collator calls `batch_encode_plus`, which transformers 5 removed: `__call__` is it."""
    if not hasattr(tokenizer, "batch_encode_plus"):
        object.__setattr__(tokenizer, "batch_encode_plus", lambda texts, **kw: tokenizer(texts, **kw))


def build_pairrm_ranker(ranker_config: dict[str, Any], backbone_config: Any, tokenizer: Any) -> tuple[Any, Any]:
    """A freshly initialised `CrossCompareReranker` and its collator, built by llm-blender's code."""
    import_llm_blender()
    from llm_blender.pair_ranker.config import RankerConfig
    from llm_blender.pair_ranker.model_util import build_collator
    from llm_blender.pair_ranker.ranker import CrossCompareReranker
    from transformers import AutoModel

    config = RankerConfig.from_dict(ranker_config)
    _restore_batch_encode_plus(tokenizer)
    # The collator registers the prefix tokens (<|source|>, <|candidate1|>, ...) on the tokenizer.
    collator = build_collator("pairranker", tokenizer, config.source_maxlength, config.candidate_maxlength)
    backbone = AutoModel.from_config(backbone_config)
    backbone.resize_token_embeddings(len(tokenizer))
    backbone.config.out_hidden_state_size = backbone.config.hidden_size
    ranker = CrossCompareReranker(backbone, config, tokenizer)
    return ranker, collator


def _backbone_config(model_dir: Path, ranker_config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    local = model_dir / "backbone_config.json"
    try:
        if local.is_file():
            data = json.loads(local.read_text())
            return AutoConfig.for_model(data.pop("model_type"), **data)
        return AutoConfig.from_pretrained(ranker_config["model_name"], trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotLoadable(f"cannot build the PairRM backbone config: {exc}") from exc


def _read_state_dict(model_dir: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    try:
        if (model_dir / "model.safetensors").is_file():
            return load_file(str(model_dir / "model.safetensors"))
        if (model_dir / "pytorch_model.bin").is_file():
            return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/pickle errors have no common base; re-raised as a domain error
        raise ModelNotLoadable(f"cannot read the PairRM weights: {exc}") from exc
    raise ModelNotLoadable(f"no PairRM weights ({' or '.join(PAIRRM_WEIGHT_FILES)}) in the model")


@dataclass
class LoadedPairRM:
    ranker: Any
    collator: Any
    device: str
    source_maxlength: int
    candidate_maxlength: int


def load_pairrm(model_dir: Path, *, device: str, max_length: int) -> LoadedPairRM:
    """Load a PairRM directory (see module doc) without pickle and without network for tiny models."""
    from transformers import AutoTokenizer

    ranker_config = read_ranker_config(model_dir)
    backbone_config = _backbone_config(model_dir, ranker_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise TokenizerMissing(f"the PairRM directory has no usable tokenizer: {exc}") from exc
    state_dict = _read_state_dict(model_dir)
    ranker, collator = build_pairrm_ranker(ranker_config, backbone_config, tokenizer)
    result = ranker.load_state_dict(state_dict, strict=False)
    buffers = {name for name, _ in ranker.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    if missing:
        raise ModelNotLoadable(f"PairRM weights do not match its config; missing {missing[:5]}")
    ranker.eval()
    if device.startswith("cuda") and ranker_config.get("fp16", False):
        ranker = ranker.half()
    ranker.to(device)
    source_len = int(ranker_config["source_maxlength"])
    candidate_len = int(ranker_config["candidate_maxlength"])
    total = source_len + 2 * candidate_len
    if total > max_length:  # respect the job's token limit, keeping PairRM's source/candidate ratio
        source_len = max(8, source_len * max_length // total)
        candidate_len = max(8, (max_length - source_len) // 2)
    collator.source_maxlength = source_len
    collator.candidate_maxlength = candidate_len
    return LoadedPairRM(ranker=ranker, collator=collator, device=device,
                        source_maxlength=source_len, candidate_maxlength=candidate_len)


def pairrm_source(messages: Sequence[dict[str, str]]) -> str:
    """PairRM's 'source' text: the user's instruction, with earlier turns spelled out when present."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def pairwise_logits(
    model: LoadedPairRM,
    sources: Sequence[str],
    candidates: Sequence[Sequence[str]],
    *,
    rows_per_forward: int,
    on_batch: Callable[[], None] = lambda: None,
) -> Any:
    """Logits L[b, i, j] > 0 when candidate i (placed left) beats j (placed right), for all i != j."""
    import torch

    k = len(candidates[0])
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    left_idx = torch.tensor([i for i, _ in pairs])
    right_idx = torch.tensor([j for _, j in pairs])
    prompts_per_group = max(1, math.ceil(rows_per_forward / len(pairs)))
    out = torch.zeros(len(sources), k, k)
    for start in range(0, len(sources), prompts_per_group):
        on_batch()
        rows = [{"source": s, "candidates": list(c)}
                for s, c in zip(sources[start:start + prompts_per_group],
                                candidates[start:start + prompts_per_group], strict=True)]
        enc = model.collator(rows)
        n = len(rows)
        src = enc["source_ids"].repeat_interleave(len(pairs), 0)
        src_mask = enc["source_attention_mask"].repeat_interleave(len(pairs), 0)
        cand, cand_mask = enc["candidate_ids"], enc["candidate_attention_mask"]
        left = cand[:, left_idx].reshape(n * len(pairs), -1)
        left_mask = cand_mask[:, left_idx].reshape(n * len(pairs), -1)
        right = cand[:, right_idx].reshape(n * len(pairs), -1)
        right_mask = cand_mask[:, right_idx].reshape(n * len(pairs), -1)
        logits = []
        with torch.inference_mode():
            for r in range(0, n * len(pairs), rows_per_forward):
                if r:
                    on_batch()
                sl = slice(r, r + rows_per_forward)
                result = model.ranker._forward(
                    src[sl].to(model.device), src_mask[sl].to(model.device),
                    left[sl].to(model.device), left_mask[sl].to(model.device),
                    right[sl].to(model.device), right_mask[sl].to(model.device))
                logits.append(result["logits"].float().cpu())
        block = torch.cat(logits).view(n, len(pairs))
        out[start:start + n, left_idx, right_idx] = block
    return out


def cancel_position_bias(logits: Any) -> Any:
    """D[i, j] = (L[i, j] - L[j, i]) / 2: both orders averaged, antisymmetric, zero diagonal."""
    return (logits - logits.transpose(-1, -2)) / 2
