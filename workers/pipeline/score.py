"""Score every candidate of every prompt with the job's reward model (PairRM or scalar).

Both kinds give, per prompt, a score per candidate and a K x K win-probability matrix
P[i][j] = P(candidate i beats candidate j), P[i][i] = 0.5, P[i][j] + P[j][i] = 1:

- pairrm: every ordered pair is compared in both positions; D[i][j] = (L[i][j] - L[j][i]) / 2
  cancels PairRM's position bias, P = sigmoid(D), and the score of i is the mean of D[i][j] over
  j != i (llm-blender's "max_logits" score, bias-cancelled).
- scalar: score = the reward; P = sigmoid(r_i - r_j) (Bradley-Terry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from workers.pipeline.hooks import RoundHooks
from workers.pipeline.loading import compute_device, oom_as_domain_error, resolve
from workers.pipeline.prompts import Messages


@dataclass(frozen=True)
class RewardModelSpec:
    type: Literal["pairrm", "scalar"]
    model: str
    batch_size: int = 8
    max_length: int = 1024


@dataclass
class ScoreResult:
    scores: list[list[float]]
    win_prob: list[list[list[float]]]
    wall_s: float

    @property
    def candidates_per_s(self) -> float:
        n = sum(len(row) for row in self.scores)
        return n / self.wall_s if self.wall_s > 0 else 0.0


class RewardModel:
    """A loaded reward model of either kind, with the operations the pipeline needs."""

    def __init__(self, spec: RewardModelSpec, loaded: Any):
        self.spec = spec
        self.loaded = loaded

    def score_candidates(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                         hooks: RoundHooks | None = None) -> ScoreResult:
        hooks = hooks or RoundHooks()
        start = time.perf_counter()
        with oom_as_domain_error():
            if self.spec.type == "pairrm":
                scores, win_prob = self._score_pairrm(prompts, candidates, hooks)
            else:
                scores, win_prob = self._score_scalar(prompts, candidates, hooks)
        return ScoreResult(scores=scores, win_prob=win_prob, wall_s=time.perf_counter() - start)

    def compare(self, prompts: Sequence[Messages], first: Sequence[str], second: Sequence[str],
                hooks: RoundHooks | None = None) -> list[float]:
        """Per prompt, a logit > 0 when `first` beats `second` (PairRM: both orders; scalar: r1 - r2)."""
        result = self.score_candidates(prompts, [[a, b] for a, b in zip(first, second, strict=True)], hooks)
        if self.spec.type == "pairrm":
            return [row[0] for row in result.scores]  # with K=2 the score of 0 is D[0][1]
        return [row[0] - row[1] for row in result.scores]

    def rewards(self, prompts: Sequence[Messages], responses: Sequence[str],
                hooks: RoundHooks | None = None) -> list[float]:
        """Scalar rewards only (PairRM has no absolute reward)."""
        from workers.pipeline.scalar_rm import scalar_rewards

        if self.spec.type != "scalar":
            raise TypeError("absolute rewards need a scalar reward model")
        hooks = hooks or RoundHooks()
        with oom_as_domain_error():
            return scalar_rewards(self.loaded, prompts, responses, batch_size=self.spec.batch_size,
                                  on_batch=hooks.check_cancelled)

    def _score_pairrm(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                      hooks: RoundHooks) -> tuple[list[list[float]], list[list[list[float]]]]:
        import torch

        from workers.pipeline.pairrm import cancel_position_bias, pairrm_source, pairwise_logits

        logits = pairwise_logits(self.loaded, [pairrm_source(p) for p in prompts], candidates,
                                 rows_per_forward=self.spec.batch_size, on_batch=hooks.check_cancelled)
        d = cancel_position_bias(logits)
        k = d.shape[-1]
        scores = (d.sum(-1) / max(k - 1, 1)).tolist()
        return scores, torch.sigmoid(d).tolist()

    def _score_scalar(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                      hooks: RoundHooks) -> tuple[list[list[float]], list[list[list[float]]]]:
        from workers.pipeline.scalar_rm import scalar_rewards

        flat_prompts = [p for p, c in zip(prompts, candidates, strict=True) for _ in c]
        flat = [x for c in candidates for x in c]
        rewards = scalar_rewards(self.loaded, flat_prompts, flat, batch_size=self.spec.batch_size,
                                 on_batch=hooks.check_cancelled)
        scores, matrices, i = [], [], 0
        for c in candidates:
            row = rewards[i:i + len(c)]
            i += len(c)
            scores.append(row)
            matrices.append([[_sigmoid(a - b) for b in row] for a in row])
        return scores, matrices


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def load_reward_model(spec: RewardModelSpec, model_root: Path) -> RewardModel:
    resolved = resolve(spec.model, model_root)
    if spec.type == "pairrm":
        from workers.pipeline.pairrm import load_pairrm

        location = Path(resolved.location) if resolved.is_local else _download_pairrm(resolved.location)
        with oom_as_domain_error():
            loaded = load_pairrm(location, device=compute_device(), max_length=spec.max_length)
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
