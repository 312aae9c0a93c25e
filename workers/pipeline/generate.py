"""K samples per prompt from the round's policy: vLLM when available on a GPU, transformers otherwise.

Both backends take the same `GenerationConfig` and `PolicyModel` and return the same result:
completions decoded without the prompt, plus prompt and completion token counts (for tokens/s).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.config import VLLM_LORA_RANKS
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import has_gpu, inference_policy, load_tokenizer, model_cache, oom_as_domain_error
from workers.pipeline.prompts import Messages, render_prompts_ids


@dataclass(frozen=True)
class GenerationConfig:
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0
    tensor_parallel_size: int = 1  # vLLM only: GPUs the offline engine shards the model over
    gpu_memory_utilization: float = 0.85  # vLLM only: share of each GPU the engine may take

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("samples_per_prompt, max_new_tokens and batch_size must be >= 1")
        if self.tensor_parallel_size < 1 or not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("tensor_parallel_size must be >= 1 and gpu_memory_utilization in (0, 1]")


@dataclass(frozen=True)
class PolicyModel:
    """What to generate with: a base model, optionally with the job's cumulative LoRA adapter."""

    base_location: str
    adapter_dir: Path | None = None


@dataclass
class GenerationResult:
    completions: list[list[str]]
    completion_tokens: list[list[int]]
    prompt_tokens: list[int]
    wall_s: float
    backend: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_completion_tokens(self) -> int:
        return sum(sum(row) for row in self.completion_tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.total_completion_tokens / self.wall_s if self.wall_s > 0 else 0.0


def is_vllm_available() -> bool:
    """vLLM is a GPU-image dependency: use it only when it is installed and a GPU is present."""
    return importlib.util.find_spec("vllm") is not None and has_gpu()


def generate_completions(policy: PolicyModel, prompts: Sequence[Messages], config: GenerationConfig,
                         hooks: RoundHooks | None = None, *, backend: str = "auto") -> GenerationResult:
    hooks = hooks or RoundHooks()
    chosen = backend if backend != "auto" else ("vllm" if is_vllm_available() else "transformers")
    with oom_as_domain_error():
        if chosen == "vllm":
            return _generate_vllm(policy, prompts, config, hooks)
        return _generate_transformers(policy, prompts, config, hooks)


def _generate_transformers(policy: PolicyModel, prompts: Sequence[Messages], config: GenerationConfig,
                           hooks: RoundHooks) -> GenerationResult:
    import torch

    tokenizer = load_tokenizer(policy.base_location)
    model = inference_policy(policy.base_location, policy.adapter_dir)  # frozen, shared: only read here
    device = next(model.parameters()).device
    prompt_ids = render_prompts_ids(tokenizer, prompts)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    k = config.samples_per_prompt
    sampling = config.temperature > 0
    completions: list[list[str]] = []
    counts: list[list[int]] = []
    start = time.perf_counter()
    for b, first in enumerate(range(0, len(prompt_ids), config.batch_size)):
        hooks.check_cancelled()
        batch = prompt_ids[first:first + config.batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        torch.manual_seed(config.seed * 1_000_003 + b)  # reproducible per batch, whatever ran before
        kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "pad_token_id": pad_id,
                                  "eos_token_id": eos_ids, "do_sample": sampling}
        if sampling:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0, num_return_sequences=k)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out[:, width:].tolist()
        if not sampling:  # greedy decoding has one answer; all K samples are it
            new = [row for row in new for _ in range(k)]
        for i in range(len(batch)):
            rows = [_cut_at_eos(row, eos_ids, pad_id) for row in new[i * k:(i + 1) * k]]
            completions.append([tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows])
            counts.append([len(r) for r in rows])
    wall = time.perf_counter() - start
    return GenerationResult(completions=completions, completion_tokens=counts,
                            prompt_tokens=[len(ids) for ids in prompt_ids], wall_s=wall,
                            backend="transformers")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = model.generation_config.eos_token_id
    # a copy: the model (and its generation config) may be shared through the model cache
    ids = list(configured) if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cut_at_eos(row: list[int], eos_ids: list[int], pad_id: int) -> list[int]:
    """Generated tokens up to and including the first EOS; padding after it is not generated."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[:i + 1]
    while row and row[-1] == pad_id and pad_id not in eos_ids:
        row = row[:-1]
    return row


def _generate_vllm(policy: PolicyModel, prompts: Sequence[Messages], config: GenerationConfig,
                   hooks: RoundHooks) -> GenerationResult:
    """vLLM offline engine; the adapter is served through `LoRARequest` rather than merged.

    The engine lives for one call: the worker trains on the same GPUs between generations, so the
    engine is shut down and its memory handed back before returning (also on cancel or error).
    """
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    tokenizer = load_tokenizer(policy.base_location)
    prompt_ids = render_prompts_ids(tokenizer, prompts)
    lora_rank = _adapter_rank(policy.adapter_dir)
    model_cache.evict_accelerator_models()  # cached GPU models would hold memory vLLM counts on
    _release_gpu_memory()  # what training left in torch's cache: vLLM sizes its KV cache from free memory
    llm = LLM(model=policy.base_location, tokenizer=policy.base_location, trust_remote_code=False,
              load_format="safetensors", seed=config.seed, dtype="auto",
              tensor_parallel_size=config.tensor_parallel_size,
              gpu_memory_utilization=config.gpu_memory_utilization,
              enable_lora=lora_rank is not None, max_lora_rank=vllm_lora_rank(lora_rank or 16))
    try:
        params = SamplingParams(n=config.samples_per_prompt, temperature=config.temperature, top_p=config.top_p,
                                max_tokens=config.max_new_tokens, seed=config.seed)
        lora = LoRARequest("policy", 1, str(policy.adapter_dir)) if lora_rank is not None else None
        completions: list[list[str]] = []
        counts: list[list[int]] = []
        start = time.perf_counter()
        chunk = max(config.batch_size, 256)  # vLLM batches internally; chunks only bound cancel latency
        for first in range(0, len(prompt_ids), chunk):
            hooks.check_cancelled()
            batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids[first:first + chunk]]
            for request in llm.generate(batch, params, lora_request=lora, use_tqdm=False):
                completions.append([o.text.strip() for o in request.outputs])
                counts.append([len(o.token_ids) for o in request.outputs])
        wall = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        _release_gpu_memory()
    return GenerationResult(completions=completions, completion_tokens=counts,
                            prompt_tokens=[len(ids) for ids in prompt_ids], wall_s=wall, backend="vllm")


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as `max_lora_rank` that holds an adapter of rank `rank`."""
    fitting = [allowed for allowed in VLLM_LORA_RANKS if allowed >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
    return fitting[0]


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _adapter_rank(adapter_dir: Path | None) -> int | None:
    if adapter_dir is None:
        return None
    import json

    return int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
