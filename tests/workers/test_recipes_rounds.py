"""Every algorithm and every new reward type runs two rounds in process on the tiny models and trains
the policy: sppo with PairRM, ipo with a judge (a local fake endpoint), rejection sampling with the
implicit reward, and DPO with a rules reward (which also raises the held-out rule-satisfaction rate).
Kept small (16-24 prompts, K=4, 16 new tokens, a high learning rate) so each case takes seconds."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from app.schemas.job_spec import JobSpec
from tests.workers.fake_judge import fake_judge
from workers.errors import JudgeEndpointNotAllowed
from workers.pipeline import artifacts
from workers.pipeline.pair import load_pairs
from workers.pipeline.round import RoundContext, run_round
from workers.tiny_models import LIKED_WORDS, synthetic_prompts

LIKED = "|".join(LIKED_WORDS)
# A ladder of rules: at least one, two, three liked words. The untrained policy's 16 random words
# rarely keep all three; each rung it misses costs one, so candidates are ranked, not just split.
AT_LEAST_N_LIKED = [rf"(?:\b(?:{LIKED})\b.*?){{{n}}}" for n in (1, 2, 3)]


def _spec(**overrides) -> JobSpec:
    body = dict(
        base_model="tiny-mistral", prompt_set="ps", rounds=2, samples_per_prompt=4, eval_fraction=0.25,
        reuse_prompts=True,
        generation={"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "batch_size": 24},
        training={"learning_rate": 3e-2, "epochs": 2, "batch_size": 4, "max_length": 96, "max_prompt_length": 48,
                  "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "lora": {"r": 8, "alpha": 16}},
    )
    body.update(overrides)
    return JobSpec.model_validate(body)


def _adapter(tmp_path, round_index: int) -> dict[str, torch.Tensor]:
    return load_file(str(artifacts.round_paths(tmp_path, "job", round_index).model / "adapter_model.safetensors"))


def _run_two_rounds(spec: JobSpec, tiny_models, tmp_path, prompts, allowlist=()) -> list[dict]:
    results = []
    for n in (1, 2):
        ctx = RoundContext(job_id="job", round_index=n, spec=spec, prompts=prompts, artifact_root=tmp_path,
                           model_root=tiny_models.root, judge_endpoint_allowlist=tuple(allowlist))
        results.append(run_round(ctx).metrics)
    first, second = _adapter(tmp_path, 1), _adapter(tmp_path, 2)
    # LoRA's B starts at zero: round 1 moved it, and round 2 kept training the same adapter.
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in first.items())
    assert set(first) == set(second) and any(not torch.equal(first[k], second[k]) for k in first)
    for metrics in results:
        assert metrics["pairs_kept"] > 0 and metrics["train_steps"] > 0
        for key in ("eval_win_rate", "eval_lc_win_rate", "eval_mean_length", "eval_base_mean_length"):
            assert key in metrics
    return results


def test_sppo_with_pairrm_trains_on_soft_win_probabilities(tiny_models, tmp_path):
    spec = _spec(algorithm={"type": "sppo", "beta": 0.1},
                 reward_model={"type": "pairrm", "model": tiny_models.pairrm, "batch_size": 48})
    _run_two_rounds(spec, tiny_models, tmp_path, synthetic_prompts(16, seed=21))
    rows = load_pairs(artifacts.round_paths(tmp_path, "job", 2).pairs)
    assert {"p_win", "p_lose"} <= set(rows.column_names)
    assert all(0.5 < w <= 1.0 and 0.0 <= lose < 0.5 for w, lose in zip(rows["p_win"], rows["p_lose"], strict=True))


def test_ipo_with_a_judge_asks_both_orders(tiny_models, tmp_path):
    with fake_judge() as (url, judge):
        spec = _spec(algorithm={"type": "ipo", "beta": 0.1},
                     reward_model={"type": "judge", "model": "fake-judge", "judge": {"endpoint": url}})
        _run_two_rounds(spec, tiny_models, tmp_path, synthetic_prompts(16, seed=22), allowlist=[url])
    assert judge.requests and all(r["model"] == "fake-judge" for r in judge.requests)
    # 12 training prompts x K(K-1) = 12 ordered pairs each, per round, plus the held-out comparisons.
    assert len(judge.requests) >= 2 * 12 * 12


def test_rejection_sampling_with_the_implicit_reward(tiny_models, tmp_path):
    spec = _spec(algorithm={"type": "rejection_sampling"},
                 reward_model={"type": "implicit", "model": tiny_models.policy_liked,
                               "reference_model": tiny_models.policy, "length_normalize": True})
    results = _run_two_rounds(spec, tiny_models, tmp_path, synthetic_prompts(16, seed=23))
    best = load_pairs(artifacts.round_paths(tmp_path, "job", 1).pairs)
    assert {"prompt", "completion", "score"} <= set(best.column_names) and "rejected" not in best.column_names
    # The implicit reward prefers liked words; SFT on the best answers moves the policy towards them.
    assert results[-1]["eval_mean_reward"] > results[-1]["eval_base_mean_reward"]


def test_dpo_with_a_rules_reward_raises_the_held_out_rule_satisfaction(tiny_models, tmp_path):
    spec = _spec(eval_fraction=0.34, reward_model={"type": "rules", "rules": {"must_match": AT_LEAST_N_LIKED}},
                 training={"learning_rate": 3e-2, "epochs": 4, "batch_size": 4, "max_length": 96,
                           "max_prompt_length": 48, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                           "lora": {"r": 8, "alpha": 16}})
    results = _run_two_rounds(spec, tiny_models, tmp_path, synthetic_prompts(48, seed=24))
    final = results[-1]  # 16 held-out prompts, the same for the base and every round
    assert final["eval_rule_satisfaction"] > final["eval_base_rule_satisfaction"] + 0.25, final


def test_a_judge_outside_the_allowlist_is_refused(tiny_models, tmp_path):
    spec = _spec(reward_model={"type": "judge", "model": "j", "judge": {"endpoint": "http://127.0.0.1:9/v1"}})
    ctx = RoundContext(job_id="job", round_index=1, spec=spec, prompts=synthetic_prompts(8, seed=25),
                       artifact_root=tmp_path, model_root=tiny_models.root,
                       judge_endpoint_allowlist=("http://127.0.0.1:9/v1-other",))
    with pytest.raises(JudgeEndpointNotAllowed):
        run_round(ctx)
    # Refused before a single request: generation ran, scoring did not.
    paths = artifacts.round_paths(tmp_path, "job", 1)
    assert paths.generations.is_file() and not paths.scores.exists()
