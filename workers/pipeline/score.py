"""Score every candidate of every prompt with the job's reward (PairRM, scalar, implicit, judge, rules).

Every kind gives, per prompt, a score per candidate and a K x K pairwise logit matrix D
(antisymmetric, zero diagonal) whose sigmoid is the win-probability matrix
P[i][j] = P(candidate i beats candidate j), P[i][i] = 0.5, P[i][j] + P[j][i] = 1:

- pairrm: every ordered pair is compared in both positions; D[i][j] = (L[i][j] - L[j][i]) / 2
  cancels PairRM's position bias, and the score of i is the mean of D[i][j] over j != i
  (llm-blender's "max_logits" score, bias-cancelled).
- judge: the same shape from a chat model's verdicts in both orders (`workers.pipeline.judge`).
- scalar, implicit, rules: an absolute reward r per answer; score = r and D[i][j] = r_i - r_j
  (Bradley-Terry).

Rules added to another kind (`reward_model.rules` + `weights`) are summed in: score =
w_model * score_model + w_rules * r_rules and D = w_model * D_model + w_rules * (r_i - r_j).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from workers.pipeline.hooks import RoundHooks
from workers.pipeline.judge import JudgeSettings
from workers.pipeline.loading import compute_device, location_fingerprint, model_cache, oom_as_domain_error, resolve
from workers.pipeline.prompts import Messages
from workers.pipeline.rules import RuleScorer, RuleSet

# Kinds with an absolute reward per answer; the others only compare answers.
ABSOLUTE_KINDS = ("scalar", "implicit", "rules")


@dataclass(frozen=True)
class RewardModelSpec:
    type: Literal["pairrm", "scalar", "implicit", "rules", "judge"]
    model: str | None
    batch_size: int = 8
    max_length: int = 1024
    reference_model: str | None = None  # implicit
    length_normalize: bool = False  # implicit
    rules: RuleSet | None = None  # type rules, or added to another type
    model_weight: float = 1.0
    rules_weight: float = 1.0
    judge: JudgeSettings | None = None

    @property
    def is_absolute(self) -> bool:
        """Answers get a reward of their own (not only a comparison with other answers)."""
        return self.type in ABSOLUTE_KINDS


def reward_model_spec(config: Any) -> RewardModelSpec:
    """The pipeline's spec from the job's `app.schemas.job_spec.RewardModelConfig`."""
    weights = config.weights
    return RewardModelSpec(
        type=config.type, model=config.model, batch_size=config.batch_size, max_length=config.max_length,
        reference_model=config.reference_model, length_normalize=config.length_normalize,
        rules=RuleSet.from_config(config.rules) if config.rules is not None else None,
        model_weight=weights.model if weights is not None else 1.0,
        rules_weight=weights.rules if weights is not None else 1.0,
        judge=JudgeSettings.from_config(config.judge, config.model) if config.judge is not None else None)


@dataclass
class ScoreResult:
    scores: list[list[float]]
    win_prob: list[list[list[float]]]
    wall_s: float
    logits: list[list[list[float]]] | None = None  # D, before the sigmoid

    @property
    def candidates_per_s(self) -> float:
        n = sum(len(row) for row in self.scores)
        return n / self.wall_s if self.wall_s > 0 else 0.0


class RewardModel:
    """A loaded reward of any kind, with the operations the pipeline needs."""

    def __init__(self, spec: RewardModelSpec, loaded: Any):
        self.spec = spec
        self.loaded = loaded
        self.rules = RuleScorer(spec.rules) if spec.rules is not None else None

    def score_candidates(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                         hooks: RoundHooks | None = None) -> ScoreResult:
        hooks = hooks or RoundHooks()
        start = time.perf_counter()
        with oom_as_domain_error():
            scores, logits = self._score(prompts, candidates, hooks)
        win_prob = [[[_sigmoid(x) for x in row] for row in matrix] for matrix in logits]
        return ScoreResult(scores=scores, win_prob=win_prob, wall_s=time.perf_counter() - start, logits=logits)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str],
                hooks: RoundHooks | None = None) -> list[float]:
        """Per prompt, the logit D[first][second]: > 0 when `first` beats `second`."""
        result = self.score_candidates(prompts, [[a, b] for a, b in zip(first, second, strict=True)], hooks)
        return [matrix[0][1] for matrix in result.logits or []]

    def rewards(self, prompts: Sequence[Messages], responses: Sequence[str],
                hooks: RoundHooks | None = None) -> list[float]:
        """Absolute rewards (scalar, implicit, rules, and those plus rules); PairRM and judges only compare."""
        if not self.spec.is_absolute:
            raise TypeError(f"a {self.spec.type} reward has no absolute reward per answer")
        hooks = hooks or RoundHooks()
        with oom_as_domain_error():
            return self._absolute(prompts, responses, hooks)

    # -- internals --------------------------------------------------------------------------------
    def _model_rewards(self, prompts: Sequence[Messages], responses: Sequence[str], hooks: RoundHooks) -> list[float]:
        if self.spec.type == "scalar":
            from workers.pipeline.scalar_rm import scalar_rewards

            return scalar_rewards(self.loaded, prompts, responses, batch_size=self.spec.batch_size,
                                  on_batch=hooks.check_cancelled)
        from workers.pipeline.implicit_rm import implicit_rewards

        return implicit_rewards(self.loaded, prompts, responses, batch_size=self.spec.batch_size,
                                on_batch=hooks.check_cancelled)

    def _absolute(self, prompts: Sequence[Messages], responses: Sequence[str], hooks: RoundHooks) -> list[float]:
        if self.spec.type == "rules":
            assert self.rules is not None
            return self.rules.rewards(responses)
        rewards = self._model_rewards(prompts, responses, hooks)
        if self.rules is None:
            return rewards
        rules = self.rules.rewards(responses)
        return [self.spec.model_weight * m + self.spec.rules_weight * r for m, r in zip(rewards, rules, strict=True)]

    def _score(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
               hooks: RoundHooks) -> tuple[list[list[float]], list[list[list[float]]]]:
        if self.spec.is_absolute:
            flat_prompts = [p for p, c in zip(prompts, candidates, strict=True) for _ in c]
            flat = self._absolute(flat_prompts, [x for c in candidates for x in c], hooks)
            scores, i = [], 0
            for c in candidates:
                scores.append(flat[i:i + len(c)])
                i += len(c)
            return scores, [_differences(row) for row in scores]
        if self.spec.type == "pairrm":
            logits = self._pairrm_logits(prompts, candidates, hooks)
        else:
            logits = self.loaded.pairwise_logits(prompts, candidates, on_batch=hooks.check_cancelled)
        scores = [[sum(row) / max(len(row) - 1, 1) for row in matrix] for matrix in logits]
        if self.rules is None:
            return scores, logits
        w_m, w_r = self.spec.model_weight, self.spec.rules_weight
        combined_scores, combined_logits = [], []
        for row, matrix, cands in zip(scores, logits, candidates, strict=True):
            rules = self.rules.rewards(cands)
            rule_d = _differences(rules)
            combined_scores.append([w_m * s + w_r * r for s, r in zip(row, rules, strict=True)])
            combined_logits.append([[w_m * d + w_r * e for d, e in zip(dr, er, strict=True)]
                                    for dr, er in zip(matrix, rule_d, strict=True)])
        return combined_scores, combined_logits

    def _pairrm_logits(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                       hooks: RoundHooks) -> list[list[list[float]]]:
        from workers.pipeline.pairrm import cancel_position_bias, pairrm_source, pairwise_logits

        logits = pairwise_logits(self.loaded, [pairrm_source(p) for p in prompts], candidates,
                                 rows_per_forward=self.spec.batch_size, on_batch=hooks.check_cancelled)
        return cancel_position_bias(logits).tolist()


def _differences(rewards: Sequence[float]) -> list[list[float]]:
    return [[a - b for b in rewards] for a in rewards]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def load_reward_model(spec: RewardModelSpec, model_root: Path, *,
                      judge_allowlist: Sequence[str] = ()) -> RewardModel:
    """Load what the spec names. A judge is refused unless its endpoint is in `judge_allowlist`
    (the service's `judge_endpoint_allowlist`; empty, the default, allows none)."""
    if spec.type == "rules":
        if spec.rules is None:
            raise ValueError("a rules reward needs its rules: build the spec with reward_model_spec()")
        return RewardModel(spec, None)
    if spec.type == "judge":
        from workers.pipeline.judge import ChatJudge

        if spec.judge is None:
            raise ValueError("a judge reward needs its settings: build the spec with reward_model_spec()")
        return RewardModel(spec, ChatJudge(spec.judge, judge_allowlist))
    if spec.model is None:
        raise ValueError(f"a {spec.type} reward needs a model")
    resolved = resolve(spec.model, model_root)
    if spec.type == "pairrm":
        from workers.pipeline.pairrm import load_pairrm

        location = Path(resolved.location) if resolved.is_local else _download_pairrm(resolved.location)
        device = compute_device()
        with oom_as_domain_error():  # in eval mode and only read from, so shared through the model cache
            loaded = model_cache.get(("pairrm", str(location), device, spec.max_length), location_fingerprint(location),
                                     lambda: load_pairrm(location, device=device, max_length=spec.max_length),
                                     device=device)
        return RewardModel(spec, loaded)
    if spec.type == "implicit":
        from workers.pipeline.implicit_rm import load_implicit_rm

        if spec.reference_model is None:
            raise ValueError("an implicit reward needs a reference model: build the spec with reward_model_spec()")
        reference = resolve(spec.reference_model, model_root)
        with oom_as_domain_error():
            loaded = load_implicit_rm(resolved.location, reference.location, max_length=spec.max_length,
                                      length_normalize=spec.length_normalize)
        return RewardModel(spec, loaded)
    from workers.pipeline.scalar_rm import load_scalar_rm

    with oom_as_domain_error():
        loaded = load_scalar_rm(resolved.location, max_length=spec.max_length, is_local=resolved.is_local)
    return RewardModel(spec, loaded)


def _download_pairrm(repo_id: str) -> Path:
    """Fetch a hub PairRM without its pickle files (config.bin, training_args.bin)."""
    from huggingface_hub import snapshot_download

    from workers.errors import ModelNotFound

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model"]))
    except Exception as exc:  # hub errors have many types; all mean "not available"
        raise ModelNotFound(f"cannot fetch reward model {repo_id!r}: {exc}") from exc
