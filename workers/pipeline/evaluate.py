"""Held-out evaluation of the new policy against the base model, by the job's reward model.

Per held-out prompt, one sample from the new policy and one from the base (the base samples are
cached per job). Outcome o in [0, 1] = P(new beats base):

- pairrm, judge: sigmoid of the position-bias-cancelled pairwise logit of (new vs base), both orders.
- scalar, implicit, rules: 1 if r(new) > r(base), 0.5 on a tie, 0 otherwise.

Metrics:
- win_rate: mean outcome.
- lc_win_rate: length-controlled win rate (AlpacaEval 2 style): a logistic regression of the
  outcome on the length difference (tanh of the token difference over its std), read at zero
  length difference. Mild L2 regularisation keeps all-wins / all-losses finite.
- mean_reward / base_mean_reward: absolute kinds: the mean reward of the new / base answers.
  pairrm, judge: the mean pairwise logit of the new answer against the base answer
  (bias-cancelled), and 0.0 for the base (the base answer against itself), so "reward" is always
  relative to the base answer.
- mean_length / base_mean_length: mean completion length in tokens.
- rule_satisfaction / base_rule_satisfaction (when the reward has rules): share of answers that
  keep every rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class EvalResult:
    win_rate: float
    lc_win_rate: float
    mean_reward: float
    base_mean_reward: float
    mean_length: float
    base_mean_length: float
    n_prompts: int
    rule_satisfaction: float | None = None
    base_rule_satisfaction: float | None = None

    def as_metrics(self) -> dict[str, float]:
        return {f"eval_{k}" if not k.startswith("eval_") else k: v for k, v in asdict(self).items()
                if v is not None}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def fit_logistic(features: Sequence[float], outcomes: Sequence[float], l2: float = 0.1,
                 iterations: int = 50) -> tuple[float, float]:
    """(intercept, slope) of P(win) = sigmoid(a + b x) fitted to soft outcomes by Newton's method."""
    a = b = 0.0
    for _ in range(iterations):
        g_a, g_b = l2 * a, l2 * b
        h_aa, h_ab, h_bb = l2, 0.0, l2
        for x, y in zip(features, outcomes, strict=True):
            p = _sigmoid(a + b * x)
            w = p * (1 - p)
            g_a += p - y
            g_b += (p - y) * x
            h_aa += w
            h_ab += w * x
            h_bb += w * x * x
        det = h_aa * h_bb - h_ab * h_ab
        if det <= 1e-12:
            break
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        a, b = a - step_a, b - step_b
        if abs(step_a) + abs(step_b) < 1e-10:
            break
    return a, b


def length_controlled_win_rate(outcomes: Sequence[float], length_new: Sequence[float],
                               length_base: Sequence[float]) -> float:
    if not outcomes:
        raise ValueError("no outcomes to evaluate")
    diffs = [n - b for n, b in zip(length_new, length_base, strict=True)]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    features = [math.tanh(d / std) if std > 0 else 0.0 for d in diffs]
    intercept, _ = fit_logistic(features, [min(1.0, max(0.0, o)) for o in outcomes])
    return _sigmoid(intercept)


def summarize(outcomes: Sequence[float], rewards_new: Sequence[float], rewards_base: Sequence[float],
              length_new: Sequence[float], length_base: Sequence[float]) -> EvalResult:
    n = len(outcomes)
    return EvalResult(
        win_rate=sum(outcomes) / n,
        lc_win_rate=length_controlled_win_rate(outcomes, length_new, length_base),
        mean_reward=sum(rewards_new) / n,
        base_mean_reward=sum(rewards_base) / n,
        mean_length=sum(length_new) / n,
        base_mean_length=sum(length_base) / n,
        n_prompts=n,
    )


def scalar_outcome(reward_new: float, reward_base: float) -> float:
    if reward_new > reward_base:
        return 1.0
    return 0.5 if reward_new == reward_base else 0.0
