import pytest
import torch

from workers.errors import InvalidTrainingConfig
from workers.pipeline.loading import load_causal_lm
from workers.pipeline.train import StartingPolicy, TrainConfig, train_dpo, trl_loss_types


def _config(**kw):
    defaults = dict(learning_rate=1e-2, epochs=1, batch_size=4, max_length=64, max_prompt_length=32,
                    warmup_ratio=0.0, lr_scheduler_type="constant")
    return TrainConfig(**{**defaults, **kw})


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_round_one_then_round_two_continues_the_same_adapter(tiny_models, pairs, tmp_path):
    from safetensors.torch import load_file

    base = str(tiny_models.root / tiny_models.policy)
    first = train_dpo(_config(), StartingPolicy(base), pairs, tmp_path / "r1", tmp_path / "s1")
    assert first.is_adapter and first.steps == 2 and first.samples_per_s > 0
    assert (tmp_path / "r1" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "r1" / "tokenizer.json").is_file()
    adapter1 = load_file(str(tmp_path / "r1" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter1.items())  # B starts at 0

    second = train_dpo(_config(), StartingPolicy(base, adapter_dir=tmp_path / "r1"), pairs,
                       tmp_path / "r2", tmp_path / "s2")
    adapter2 = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    assert set(adapter2) == set(adapter1)  # one cumulative adapter, not a second one
    assert any(not torch.equal(adapter1[k], adapter2[k]) for k in adapter1)
    assert second.train_loss < 0.6931  # round-start reference: the policy starts at the reference
    base_after = _state(load_causal_lm(base))
    assert all(torch.equal(v, _state(load_causal_lm(base))[k]) for k, v in base_after.items())


def test_full_fine_tuning_changes_the_weights_and_saves_a_full_model(tiny_models, pairs, tmp_path):
    base = str(tiny_models.root / tiny_models.policy)
    before = _state(load_causal_lm(base))
    result = train_dpo(_config(method="full", learning_rate=1e-3, reference="base"), StartingPolicy(base),
                       pairs, tmp_path / "full", tmp_path / "scratch")
    assert not result.is_adapter
    after = _state(load_causal_lm(str(tmp_path / "full")))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2


def test_loss_types_come_from_trl_and_unknown_ones_are_refused(tiny_models, pairs, tmp_path):
    assert {"sigmoid", "ipo", "hinge", "robust", "sppo_hard", "apo_zero"} <= trl_loss_types()
    with pytest.raises(InvalidTrainingConfig):
        train_dpo(_config(loss_type="not_a_loss"), StartingPolicy(str(tiny_models.root / tiny_models.policy)),
                  pairs, tmp_path / "x", tmp_path / "y")


def test_robust_loss_with_label_smoothing_runs(tiny_models, pairs, tmp_path):
    result = train_dpo(_config(loss_type="robust", label_smoothing=0.1),
                       StartingPolicy(str(tiny_models.root / tiny_models.policy)), pairs,
                       tmp_path / "m", tmp_path / "s")
    assert result.steps == 2


def test_drop_long_prompts_keeps_what_fits_as_the_per_row_filter_would(tiny_models):
    from datasets import Dataset

    from workers.pipeline.loading import load_tokenizer
    from workers.pipeline.prompts import ensure_chat_template
    from workers.pipeline.train import drop_long_prompts

    tokenizer = load_tokenizer(str(tiny_models.root / tiny_models.policy))
    ensure_chat_template(tokenizer)
    prompts = [[{"role": "user", "content": " ".join(["kind"] * n)}] for n in (1, 5, 20, 3, 40)]
    dataset = Dataset.from_list([{"prompt": p, "chosen": [{"role": "assistant", "content": "a"}]} for p in prompts])
    lengths = [len(tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]) for p in prompts]
    limit = sorted(lengths)[2]
    kept, dropped = drop_long_prompts(dataset, tokenizer, limit)
    fitting = [p for p, n in zip(prompts, lengths, strict=True) if n <= limit]
    assert dropped == 2 and [r["prompt"] for r in kept] == fitting
    everything, none = drop_long_prompts(dataset, tokenizer, max(lengths))
    assert everything is dataset and none == 0
    empty, zero = drop_long_prompts(dataset.select([]), tokenizer, limit)
    assert len(empty) == 0 and zero == 0
