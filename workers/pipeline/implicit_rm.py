"""The implicit (DPO log-ratio) reward of Merlinite: r(x, y) = log pi_model(y|x) - log pi_reference(y|x).

Two causal LMs the job names, e.g. an instruct model and its base. Each scores the answer in its
own prompt format (its chat template, else the Mistral `[INST]` fallback), so the two need not
share a tokenizer. With `length_normalize` each log-probability is averaged over the answer's
tokens before the difference, so longer answers are not rewarded for their length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workers.pipeline.loading import compute_device, inference_policy, load_tokenizer, training_dtype
from workers.pipeline.prompts import Messages, render_prompt_ids


@dataclass
class ScoringLM:
    model: Any
    tokenizer: Any


@dataclass
class LoadedImplicitRM:
    policy: ScoringLM
    reference: ScoringLM
    device: str
    max_length: int
    length_normalize: bool


def _load(location: str, device: str) -> ScoringLM:
    # frozen and shared through the model cache: the reference is often the policy's base model
    model = inference_policy(location, dtype=training_dtype(), device=device)
    return ScoringLM(model=model, tokenizer=load_tokenizer(location))


def load_implicit_rm(model_location: str, reference_location: str, *, max_length: int,
                     length_normalize: bool) -> LoadedImplicitRM:
    device = compute_device()
    return LoadedImplicitRM(policy=_load(model_location, device), reference=_load(reference_location, device),
                            device=device, max_length=max_length, length_normalize=length_normalize)


def _encode(lm: ScoringLM, prompt: Messages, response: str, max_length: int) -> tuple[list[int], int]:
    """Prompt + answer ids (the prompt's start dropped first when too long) and the answer's length."""
    answer = list(lm.tokenizer(response, add_special_tokens=False)["input_ids"])[:max_length - 1]
    prompt_ids = render_prompt_ids(lm.tokenizer, prompt)
    prompt_ids = prompt_ids[-(max_length - len(answer)):]
    return prompt_ids + answer, len(answer)


def answer_logps(lm: ScoringLM, prompts: Sequence[Messages], responses: Sequence[str], *, device: str,
                 max_length: int, batch_size: int,
                 on_batch: Callable[[], None] = lambda: None) -> tuple[list[float], list[int]]:
    """Per (prompt, answer): the summed log-probability of the answer's tokens, and their number."""
    import torch

    encoded = [_encode(lm, p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    sums: list[float] = []
    counts: list[int] = []
    for first in range(0, len(encoded), batch_size):
        on_batch()
        batch = encoded[first:first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
        # Target position t (predicted from t - 1) belongs to the answer when it is among the last n real tokens.
        answer_mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, (x, n) in enumerate(batch):
            answer_mask[row, len(x) - n:len(x)] = True
        with torch.inference_mode():
            logits = lm.model(input_ids=ids, attention_mask=mask).logits.float()
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        selected = answer_mask[:, 1:]
        sums.extend((token_logps * selected).sum(-1).cpu().tolist())
        counts.extend(selected.sum(-1).cpu().tolist())
    return sums, [int(c) for c in counts]


def implicit_rewards(rm: LoadedImplicitRM, prompts: Sequence[Messages], responses: Sequence[str], *,
                     batch_size: int, on_batch: Callable[[], None] = lambda: None) -> list[float]:
    kwargs = {"device": rm.device, "max_length": rm.max_length, "batch_size": batch_size, "on_batch": on_batch}
    policy, n_policy = answer_logps(rm.policy, prompts, responses, **kwargs)
    reference, n_reference = answer_logps(rm.reference, prompts, responses, **kwargs)
    if not rm.length_normalize:
        return [p - r for p, r in zip(policy, reference, strict=True)]
    return [p / max(n, 1) - r / max(m, 1) for p, n, r, m in zip(policy, n_policy, reference, n_reference, strict=True)]
