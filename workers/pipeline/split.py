"""Once per job: a held-out eval split and one disjoint training shard per round (Snorkel/SPPO)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from workers.errors import InvalidPrompts


@dataclass(frozen=True)
class SplitConfig:
    rounds: int
    eval_fraction: float
    reuse_prompts: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in (0, 1)")


@dataclass(frozen=True)
class PromptSplit:
    """Indices into the job's prompt list. `round_shards[n - 1]` is round n's training prompts."""

    seed: int
    eval_indices: list[int]
    round_shards: list[list[int]]

    def shard(self, round_index: int) -> list[int]:
        return self.round_shards[round_index - 1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptSplit:
        return cls(seed=int(data["seed"]), eval_indices=[int(i) for i in data["eval_indices"]],
                   round_shards=[[int(i) for i in s] for s in data["round_shards"]])


def split_prompts(n_prompts: int, config: SplitConfig) -> PromptSplit:
    """Shuffle with the recorded seed; eval gets round(n * eval_fraction) prompts, at least one.

    Without `reuse_prompts` the remaining prompts are dealt into `rounds` disjoint shards whose
    sizes differ by at most one; with it, every round trains on all of them.
    """
    n_eval = max(1, round(n_prompts * config.eval_fraction))
    n_train = n_prompts - n_eval
    needed = 1 if config.reuse_prompts else config.rounds
    if n_train < needed:
        raise InvalidPrompts(
            f"{n_prompts} prompts leave {n_train} for training after the eval split; "
            f"need at least {needed} ({config.rounds} rounds, reuse_prompts={config.reuse_prompts})")
    order = list(range(n_prompts))
    random.Random(config.seed).shuffle(order)
    eval_indices = sorted(order[:n_eval])
    train = order[n_eval:]
    if config.reuse_prompts:
        shards = [sorted(train) for _ in range(config.rounds)]
    else:
        base, extra = divmod(len(train), config.rounds)
        shards, start = [], 0
        for r in range(config.rounds):
            size = base + (1 if r < extra else 0)
            shards.append(sorted(train[start:start + size]))
            start += size
    return PromptSplit(seed=config.seed, eval_indices=eval_indices, round_shards=shards)
