"""The evaluate stage's I/O: sample the held-out prompts from the new policy and the (cached) base,
judge each pair with the job's reward model, and summarise with `evaluate.summarize`. With rules in
the reward, the share of answers that keep every rule is reported too (new and base)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers.pipeline import artifacts
from workers.pipeline.evaluate import EvalResult, scalar_outcome, summarize
from workers.pipeline.generate import PolicyModel, generate_completions
from workers.pipeline.score import RewardModel

if TYPE_CHECKING:
    from workers.pipeline.round import RoundContext

EVAL_SEED_OFFSET = 7919  # eval samples use their own seed, the same for the base and every round


def _sample(ctx: RoundContext, policy: PolicyModel, indices: list[int]) -> tuple[list[str], list[int]]:
    from workers.pipeline.round import generation_config

    config = generation_config(ctx.spec, samples=1, seed=ctx.spec.split_seed + EVAL_SEED_OFFSET)
    result = generate_completions(policy, [ctx.prompts[i] for i in indices], config, ctx.hooks,
                                  backend=ctx.generation_backend)
    return [c[0] for c in result.completions], [t[0] for t in result.completion_tokens]


def _base_samples(ctx: RoundContext, base: PolicyModel, indices: list[int],
                  reward_model: RewardModel) -> list[dict[str, Any]]:
    """The base model's held-out answers (and scalar rewards): computed once per job, then read back."""
    path = artifacts.base_eval_path(ctx.artifact_root, ctx.job_id)
    if path.is_file():
        rows = artifacts.read_jsonl(path)
        if [r["prompt_index"] for r in rows] == list(indices):
            return rows
    completions, tokens = _sample(ctx, base, indices)
    rewards: list[float | None] = [None] * len(indices)
    if reward_model.spec.is_absolute:
        rewards = list(reward_model.rewards([ctx.prompts[i] for i in indices], completions, ctx.hooks))
    rows = [{"prompt_index": i, "completion": c, "tokens": t, "reward": r}
            for i, c, t, r in zip(indices, completions, tokens, rewards, strict=True)]
    artifacts.atomic_write_jsonl(path, rows)
    return rows


def evaluate_round(ctx: RoundContext, indices: list[int], new_policy: PolicyModel, base_policy: PolicyModel,
                   reward_model: RewardModel, progress: Callable[[float], None] = lambda f: None,
                   ) -> tuple[EvalResult, list[dict[str, Any]]]:
    base_rows = _base_samples(ctx, base_policy, indices, reward_model)
    progress(0.3)
    new_completions, new_tokens = _sample(ctx, new_policy, indices)
    progress(0.7)
    prompts = [ctx.prompts[i] for i in indices]
    base_completions = [r["completion"] for r in base_rows]
    if not reward_model.spec.is_absolute:
        import math

        logits = reward_model.compare(prompts, new_completions, base_completions, ctx.hooks)
        outcomes = [1.0 / (1.0 + math.exp(-x)) for x in logits]
        rewards_new, rewards_base = list(logits), [0.0] * len(logits)
    else:
        rewards_new = reward_model.rewards(prompts, new_completions, ctx.hooks)
        rewards_base = [float(r["reward"]) for r in base_rows]
        outcomes = [scalar_outcome(n, b) for n, b in zip(rewards_new, rewards_base, strict=True)]
    result = summarize(outcomes, rewards_new, rewards_base, new_tokens, [r["tokens"] for r in base_rows])
    if reward_model.rules is not None:
        result.rule_satisfaction = reward_model.rules.satisfaction_rate(new_completions)
        result.base_rule_satisfaction = reward_model.rules.satisfaction_rate(base_completions)
    rows = [{"prompt_index": i, "completion": c, "tokens": t, "base_completion": b["completion"],
             "base_tokens": b["tokens"], "outcome": o, "reward": rn, "base_reward": rb}
            for i, c, t, b, o, rn, rb in zip(indices, new_completions, new_tokens, base_rows, outcomes,
                                             rewards_new, rewards_base, strict=True)]
    progress(1.0)
    return result, rows
