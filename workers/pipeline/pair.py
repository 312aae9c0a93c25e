"""Preference pairs from scored candidates, in TRL's conversational preference format.

Rows: {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...],
"score_chosen", "score_rejected", "margin", "prompt_index"}. Prompts whose chosen-rejected margin
is below `min_margin` are dropped, and ties (margin <= 0) always are.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.pipeline.prompts import Messages

PAIR_STATS_FILE = "alignd_pair_stats.json"


@dataclass(frozen=True)
class PairingConfig:
    strategy: Literal["best_vs_worst", "best_vs_random"] = "best_vs_worst"
    min_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in ("best_vs_worst", "best_vs_random"):
            raise ValueError(f"unknown pairing strategy {self.strategy!r}")
        if self.min_margin < 0:
            raise ValueError("min_margin must be >= 0")


@dataclass
class PairingResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped_ties: int = 0
    dropped_below_margin: int = 0

    @property
    def kept(self) -> int:
        return len(self.rows)

    @property
    def dropped(self) -> int:
        return self.dropped_ties + self.dropped_below_margin

    def stats(self) -> dict[str, int]:
        return {"pairs_kept": self.kept, "pairs_dropped": self.dropped, "pairs_dropped_ties": self.dropped_ties,
                "pairs_dropped_below_margin": self.dropped_below_margin}


def build_pairs(prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                scores: Sequence[Sequence[float]], config: PairingConfig,
                prompt_indices: Sequence[int] | None = None) -> PairingResult:
    rng = random.Random(config.seed)
    result = PairingResult()
    for n, (prompt, cands, row) in enumerate(zip(prompts, candidates, scores, strict=True)):
        best = max(range(len(row)), key=lambda i: row[i])
        if config.strategy == "best_vs_worst":
            other = min(range(len(row)), key=lambda i: row[i])
        else:
            other = rng.choice([i for i in range(len(row)) if i != best])
        margin = row[best] - row[other]
        if margin <= 0 or cands[best] == cands[other]:
            result.dropped_ties += 1
            continue
        if margin < config.min_margin:
            result.dropped_below_margin += 1
            continue
        result.rows.append({
            "prompt": list(prompt),
            "chosen": [{"role": "assistant", "content": cands[best]}],
            "rejected": [{"role": "assistant", "content": cands[other]}],
            "score_chosen": float(row[best]),
            "score_rejected": float(row[other]),
            "margin": float(margin),
            "prompt_index": int(prompt_indices[n]) if prompt_indices is not None else n,
        })
    return result


def save_pairs(result: PairingResult, out_dir: Path) -> None:
    """Write the pairs as a `datasets.Dataset` (save_to_disk) plus the kept/dropped counts."""
    import json

    from datasets import Dataset

    columns = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "prompt_index")
    data = {c: [r[c] for r in result.rows] for c in columns}
    Dataset.from_dict(data).save_to_disk(str(out_dir))
    (out_dir / PAIR_STATS_FILE).write_text(json.dumps(result.stats()))


def load_pairs(pairs_dir: Path) -> Any:
    from datasets import load_from_disk

    return load_from_disk(str(pairs_dir))


def load_pair_stats(pairs_dir: Path) -> dict[str, int]:
    import json

    return json.loads((pairs_dir / PAIR_STATS_FILE).read_text())
