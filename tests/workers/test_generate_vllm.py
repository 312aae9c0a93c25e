"""The vLLM offline generation backend (`workers.pipeline.generate._generate_vllm`).

CI has neither vLLM nor a GPU, so the first tests run the backend against a stand-in `vllm`
package whose constructors accept only the argument names vLLM 0.32 has (copied from
vllm/entrypoints/llm.py, vllm/engine/arg_utils.py, vllm/sampling_params.py and
vllm/lora/request.py of the 0.32.0 wheel) and reject a `max_lora_rank` vLLM would refuse. They
check what alignd hands vLLM: token-id prompts with exactly one BOS, n=K sampling, the adapter as a
`LoRARequest`, no remote code, safetensors, tensor parallelism, and that the engine is shut down
even when the job is cancelled mid-generation. The last test runs real vLLM on a GPU (marked
`vllm`, skipped without one).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.core.config import VLLM_LORA_RANKS, Settings
from workers.errors import JobCancelled
from workers.pipeline import generate as generate_module
from workers.pipeline.generate import GenerationConfig, PolicyModel, generate_completions, vllm_lora_rank
from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import load_tokenizer
from workers.tiny_models import synthetic_prompts

# vLLM 0.32.0: LLM.__init__'s named parameters plus the EngineArgs fields alignd passes through **kwargs.
LLM_ARGUMENTS = {"model", "tokenizer", "trust_remote_code", "tensor_parallel_size", "dtype", "seed",
                 "gpu_memory_utilization", "enforce_eager", "load_format", "enable_lora", "max_lora_rank",
                 "max_loras", "max_model_len"}
SAMPLING_ARGUMENTS = {"n", "temperature", "top_p", "top_k", "seed", "max_tokens", "stop", "min_p"}


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]


@dataclass
class FakeRequestOutput:
    outputs: list[FakeOutput]


@dataclass
class Recorder:
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    lora_requests: list[Any] = field(default_factory=list)
    shutdowns: int = 0
    generate_calls: int = 0


def install_fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            unknown = set(kwargs) - SAMPLING_ARGUMENTS
            assert not unknown, f"vLLM 0.32's SamplingParams has no {unknown}"
            self.__dict__.update(kwargs)

    class LoRARequest:
        def __init__(self, lora_name: str, lora_int_id: int, lora_path: str = "") -> None:
            assert lora_int_id >= 1, "vLLM refuses lora_int_id < 1"
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    class EngineCore:
        def shutdown(self, timeout: float | None = None) -> None:
            recorder.shutdowns += 1

    class LLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            unknown = set(kwargs) - LLM_ARGUMENTS
            assert not unknown, f"vLLM 0.32's LLM has no {unknown}"
            assert kwargs.get("max_lora_rank", 16) in VLLM_LORA_RANKS, "vLLM's LoRAConfig refuses this rank"
            recorder.llm_kwargs = {"model": model, **kwargs}
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

        def generate(self, prompts: list[dict[str, list[int]]], sampling_params: SamplingParams, *,
                     use_tqdm: bool = True, lora_request: LoRARequest | None = None) -> list[FakeRequestOutput]:
            recorder.generate_calls += 1
            recorder.params.append(sampling_params)
            recorder.lora_requests.append(lora_request)
            outputs = []
            for prompt in prompts:
                recorder.prompts.append(prompt["prompt_token_ids"])
                outputs.append(FakeRequestOutput([FakeOutput(f" answer {i} ", [7] * (i + 1))
                                                  for i in range(sampling_params.n)]))
            return outputs

    def tokens_prompt(*, prompt_token_ids: list[int]) -> dict[str, list[int]]:
        return {"prompt_token_ids": prompt_token_ids}

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = tokens_prompt
    lora = types.ModuleType("vllm.lora")
    lora_request = types.ModuleType("vllm.lora.request")
    lora_request.LoRARequest = LoRARequest
    for name, module in {"vllm": vllm, "vllm.inputs": inputs, "vllm.lora": lora,
                         "vllm.lora.request": lora_request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return recorder


def make_adapter(base: Path, out: Path, rank: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True, trust_remote_code=False)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out, safe_serialization=True)
    return out


def test_offline_engine_gets_token_prompts_n_samples_and_the_adapter(tiny_models, tmp_path, monkeypatch):
    recorder = install_fake_vllm(monkeypatch)
    base = tiny_models.root / tiny_models.policy
    adapter = make_adapter(base, tmp_path / "adapter", rank=12)
    prompts = synthetic_prompts(3, seed=5)
    config = GenerationConfig(samples_per_prompt=4, max_new_tokens=9, temperature=0.7, top_p=0.9, seed=11,
                              tensor_parallel_size=2)
    result = generate_completions(PolicyModel(str(base), adapter), prompts, config, backend="vllm")

    assert result.backend == "vllm"
    assert result.completions == [[f"answer {i}" for i in range(4)]] * 3
    assert result.completion_tokens == [[1, 2, 3, 4]] * 3 and result.total_completion_tokens == 30
    kwargs = recorder.llm_kwargs
    assert kwargs["model"] == kwargs["tokenizer"] == str(base)
    assert kwargs["trust_remote_code"] is False and kwargs["load_format"] == "safetensors"
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 16, "rank 12 rounds up to vLLM's 16"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["seed"] == 11
    [params] = recorder.params
    assert (params.n, params.max_tokens, params.temperature, params.top_p, params.seed) == (4, 9, 0.7, 0.9, 11)
    [lora] = recorder.lora_requests
    assert lora.lora_path == str(adapter) and lora.lora_int_id == 1
    bos = load_tokenizer(str(base)).bos_token_id
    assert len(recorder.prompts) == 3
    assert all(ids[0] == bos and ids.count(bos) == 1 for ids in recorder.prompts), "exactly one BOS"
    assert recorder.shutdowns == 1, "the engine hands the GPU back to training"


def test_base_model_without_adapter_runs_without_lora(tiny_models, monkeypatch):
    recorder = install_fake_vllm(monkeypatch)
    config = GenerationConfig(samples_per_prompt=2, max_new_tokens=4)
    generate_completions(PolicyModel(str(tiny_models.root / tiny_models.policy)), synthetic_prompts(2, seed=1),
                         config, backend="vllm")
    assert recorder.llm_kwargs["enable_lora"] is False and recorder.lora_requests == [None]
    assert recorder.llm_kwargs["tensor_parallel_size"] == 1


def test_cancel_between_chunks_still_shuts_the_engine_down(tiny_models, monkeypatch):
    recorder = install_fake_vllm(monkeypatch)
    calls = {"n": 0}

    def cancel_on_second_chunk() -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise JobCancelled("cancelled")

    prompts = synthetic_prompts(300, seed=2)  # two chunks of at most 256 prompts
    with pytest.raises(JobCancelled):
        generate_completions(PolicyModel(str(tiny_models.root / tiny_models.policy)), prompts,
                             GenerationConfig(samples_per_prompt=1, max_new_tokens=2), RoundHooks(
                                 check_cancelled=cancel_on_second_chunk), backend="vllm")
    assert recorder.generate_calls == 1 and recorder.shutdowns == 1


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (2, 8), (8, 8), (12, 16), (64, 64), (300, 320),
                                                (512, 512)])
def test_adapter_rank_rounds_up_to_one_vllm_accepts(rank: int, expected: int) -> None:
    assert vllm_lora_rank(rank) == expected


def test_a_rank_above_vllms_largest_is_refused() -> None:
    with pytest.raises(ValueError, match="512"):
        vllm_lora_rank(513)


def test_the_serving_rank_setting_must_be_one_vllm_accepts() -> None:
    assert Settings(vllm_max_lora_rank=128).vllm_max_lora_rank == 128
    with pytest.raises(ValueError, match="max-lora-rank"):
        Settings(vllm_max_lora_rank=48)


def test_generation_config_refuses_a_bad_parallel_size_or_memory_share() -> None:
    with pytest.raises(ValueError):
        GenerationConfig(samples_per_prompt=1, max_new_tokens=1, tensor_parallel_size=0)
    with pytest.raises(ValueError):
        GenerationConfig(samples_per_prompt=1, max_new_tokens=1, gpu_memory_utilization=1.5)


@pytest.mark.vllm
def test_real_vllm_generates_k_samples_with_the_adapter(tiny_models, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        pytest.skip("needs vLLM and a CUDA GPU (the GPU image)")
    assert generate_module.is_vllm_available()
    base = tiny_models.root / tiny_models.policy
    adapter = make_adapter(base, tmp_path / "adapter", rank=8)
    prompts = synthetic_prompts(4, seed=9)
    config = GenerationConfig(samples_per_prompt=3, max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3,
                              gpu_memory_utilization=0.3)
    result = generate_completions(PolicyModel(str(base), adapter), prompts, config)
    assert result.backend == "vllm"
    assert len(result.completions) == 4 and all(len(row) == 3 for row in result.completions)
    assert all(1 <= n <= 8 for row in result.completion_tokens for n in row)
    assert all("[INST]" not in c for row in result.completions for c in row)
