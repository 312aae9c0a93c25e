"""The in-process caches of loaded tokenizers and frozen inference models (`workers.pipeline.loading`)."""

import shutil

import pytest
import torch

from workers.pipeline import artifacts
from workers.pipeline.generate import GenerationConfig, PolicyModel, generate_completions
from workers.pipeline.loading import (
    LoadedCache,
    inference_policy,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    model_cache,
    tokenizer_cache,
)
from workers.pipeline.train import StartingPolicy, TrainConfig, train_dpo
from workers.tiny_models import synthetic_prompts


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a, b):
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def policy_copy(tiny_models, tmp_path):
    """A private copy of the tiny policy, so a test may rewrite it."""
    target = tmp_path / "policy"
    shutil.copytree(tiny_models.root / tiny_models.policy, target)
    return target


def _adapter(base_dir, out_dir):
    """A LoRA adapter with non-zero weights (a fresh one merges to a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(str(base_dir)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


def test_tokenizers_are_read_once_and_each_caller_gets_its_own_copy(policy_copy):
    hits = tokenizer_cache.hits
    first, second = load_tokenizer(str(policy_copy)), load_tokenizer(str(policy_copy))
    assert tokenizer_cache.hits == hits + 1
    assert first is not second
    first.chat_template = "{{ 'edited' }}"
    first.padding_side = "left"
    assert not second.chat_template and second.padding_side == "right"
    assert load_tokenizer(str(policy_copy)).chat_template is None
    assert first("hello kind dog")["input_ids"] == second("hello kind dog")["input_ids"]


def test_inference_policy_is_reused_frozen_and_matches_a_fresh_load(policy_copy):
    model = inference_policy(str(policy_copy))
    assert inference_policy(str(policy_copy)) is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    fresh = load_causal_lm(str(policy_copy))
    assert fresh is not model and any(p.requires_grad for p in fresh.parameters())
    assert _same_weights(model, fresh)


def test_adapter_merged_onto_the_cached_base_equals_loading_both_from_disk(policy_copy, tmp_path):
    adapter = _adapter(policy_copy, tmp_path / "adapter")
    base = inference_policy(str(policy_copy))
    merged = inference_policy(str(policy_copy), adapter)
    assert merged is not base and _same_weights(base, load_causal_lm(str(policy_copy)))  # the base stays as read
    assert _same_weights(merged, load_policy(str(policy_copy), adapter))
    assert not _same_weights(merged, base)
    assert inference_policy(str(policy_copy), adapter) is merged


def test_a_rewritten_directory_is_read_again_and_the_stale_model_dropped(policy_copy, tmp_path):
    adapter_dir = tmp_path / "round-1-model"
    with artifacts.atomic_directory(adapter_dir) as tmp:
        _adapter(policy_copy, tmp)
    first = inference_policy(str(policy_copy), adapter_dir)
    with artifacts.atomic_directory(adapter_dir) as tmp:  # a forced redo of the stage renames a new dir over it
        torch.manual_seed(1)
        _adapter(policy_copy, tmp)
    second = inference_policy(str(policy_copy), adapter_dir)
    assert second is not first and _same_weights(second, load_policy(str(policy_copy), adapter_dir))
    assert not any(m is first for m in model_cache.values())

    # an in-place rewrite of the weights (same path, same inode for the directory) is seen too
    before = inference_policy(str(policy_copy))
    changed = load_causal_lm(str(policy_copy))
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(str(policy_copy))
    after = inference_policy(str(policy_copy))
    assert after is not before and _same_weights(after, changed)


def test_generation_reuses_the_cached_policy_and_training_never_touches_it(tiny_models, tmp_path):
    from datasets import Dataset

    from workers.pipeline.pair import PairingConfig, build_pairs

    base = str(tiny_models.root / tiny_models.policy)
    prompts = synthetic_prompts(4, seed=5)
    config = GenerationConfig(samples_per_prompt=2, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=3)
    first = generate_completions(PolicyModel(base), prompts, config)
    cached = inference_policy(base)
    before = _state(cached)
    hits = model_cache.hits
    assert generate_completions(PolicyModel(base), prompts, config).completions == first.completions
    assert model_cache.hits == hits + 1

    rows = build_pairs(prompts, [["kind warm calm gentle", "the old red clock"]] * 4, [[1.0, 0.0]] * 4,
                       PairingConfig()).rows
    train_dpo(TrainConfig(method="full", learning_rate=1e-2, epochs=1, batch_size=4, max_length=64,
                          max_prompt_length=32, warmup_ratio=0.0, lr_scheduler_type="constant"),
              StartingPolicy(base_location=base), Dataset.from_list(rows), tmp_path / "full", tmp_path / "scratch")
    assert not _same_weights(load_causal_lm(str(tmp_path / "full")), cached)  # training changed its own copy
    assert inference_policy(base) is cached
    assert all(torch.equal(v, before[k]) for k, v in _state(cached).items())
    assert not any(p.requires_grad for p in cached.parameters())


def test_the_cache_is_bounded_lru_and_failed_loads_are_not_kept():
    cache = LoadedCache(max_entries=2)
    loads = []

    def get(name):
        return cache.get(name, "fp", lambda: loads.append(name) or f"value-{name}")

    assert [get("a"), get("b"), get("a")] == ["value-a", "value-b", "value-a"]
    get("c")  # evicts b, the least recently used
    assert len(cache) == 2 and loads == ["a", "b", "c"]
    get("a")
    get("b")
    assert loads == ["a", "b", "c", "b"] and len(cache) == 2

    def boom():
        raise ValueError("unreadable")

    with pytest.raises(ValueError):
        cache.get("d", "fp", boom)
    assert cache.peek("d", "fp") is None and len(cache) == 2

    disabled = LoadedCache(max_entries=0)
    assert disabled.get("a", "fp", lambda: 1) == 1 and len(disabled) == 0


def test_gpu_entries_are_bounded_in_bytes_and_evicted_before_training(monkeypatch):
    cache = LoadedCache(max_entries=8)
    monkeypatch.setattr(cache, "_accelerator_budget", lambda device: 1000)
    small = [torch.nn.Linear(10, 10) for _ in range(3)]  # 440 bytes each
    for i, module in enumerate(small):
        cache.get(("gpu", i), "fp", lambda m=module: m, device="cuda")
    cache.get("cpu", "fp", lambda: torch.nn.Linear(100, 100), device="cpu")  # CPU entries have no byte bound
    assert cache.peek(("gpu", 0), "fp") is None and cache.peek(("gpu", 2), "fp") is small[2] and len(cache) == 3
    huge = torch.nn.Linear(100, 100)
    assert cache.get("huge", "fp", lambda: huge, device="cuda") is huge and cache.peek("huge", "fp") is None
    assert cache.evict_accelerator_models() == 2
    assert len(cache) == 1 and cache.peek("cpu", "fp") is not None
