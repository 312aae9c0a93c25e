"""Training rows from scored candidates: preference pairs (DPO, SPPO) or best answers (rejection sampling).

Candidates are ranked by score minus `length_penalty` times their length in tokens (RLHFlow's
`max_min_p`; 0 ranks by score alone), which keeps length growth from being rewarded.

Pairs, in TRL's conversational preference format: {"prompt": [messages], "chosen":
[{"role": "assistant", ...}], "rejected": [...], "score_chosen", "score_rejected", "margin",
"prompt_index", "chosen_length", "rejected_length"}, plus for SPPO "p_win" and "p_lose": the means
of the chosen and rejected rows of the win-probability matrix P (all K entries, P[i][i] = 1/2, as
uclaml/SPPO). Prompts whose ranked best-worst margin is below `min_margin` are dropped, and ties
(margin <= 0, or identical texts) always are.

Best answers (rejection sampling), in TRL's conversational prompt-completion format: {"prompt",
"completion": [{"role": "assistant", ...}], "score", "prompt_index", "completion_length"}, with the
same drops (a prompt whose candidates the reward cannot tell apart gives no signal).
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
    length_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.strategy not in ("best_vs_worst", "best_vs_random"):
            raise ValueError(f"unknown pairing strategy {self.strategy!r}")
        if self.min_margin < 0 or self.length_penalty < 0:
            raise ValueError("min_margin and length_penalty must be >= 0")


@dataclass
class PairingResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped_ties: int = 0
    dropped_below_margin: int = 0
    kind: Literal["pairs", "best"] = "pairs"

    @property
    def kept(self) -> int:
        return len(self.rows)

    @property
    def dropped(self) -> int:
        return self.dropped_ties + self.dropped_below_margin

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "pairs_kept": self.kept, "pairs_dropped": self.dropped, "pairs_dropped_ties": self.dropped_ties,
            "pairs_dropped_below_margin": self.dropped_below_margin}
        length_key = "chosen_length" if self.kind == "pairs" else "completion_length"
        if self.rows:
            stats["chosen_mean_length"] = sum(r[length_key] for r in self.rows) / self.kept
            if self.kind == "pairs":
                stats["rejected_mean_length"] = sum(r["rejected_length"] for r in self.rows) / self.kept
        return stats


def ranking_scores(scores: Sequence[float], lengths: Sequence[int] | None, length_penalty: float) -> list[float]:
    """score - length_penalty * length: what candidates are ranked by."""
    if not length_penalty or lengths is None:
        return [float(s) for s in scores]
    return [float(s) - length_penalty * n for s, n in zip(scores, lengths, strict=True)]


def _lengths(cands: Sequence[str], lengths: Sequence[int] | None) -> list[int]:
    return list(lengths) if lengths is not None else [len(c.split()) for c in cands]


def build_pairs(prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                scores: Sequence[Sequence[float]], config: PairingConfig,
                prompt_indices: Sequence[int] | None = None,
                lengths: Sequence[Sequence[int]] | None = None,
                win_prob: Sequence[Sequence[Sequence[float]]] | None = None) -> PairingResult:
    """Chosen = the best-ranked candidate, rejected = the worst (or a random other one).

    `lengths` are candidate lengths in tokens (default: words); `win_prob`, when given, adds SPPO's
    p_win and p_lose to each row."""
    rng = random.Random(config.seed)
    result = PairingResult()
    for n, (prompt, cands, row) in enumerate(zip(prompts, candidates, scores, strict=True)):
        cand_lengths = _lengths(cands, lengths[n] if lengths is not None else None)
        ranked = ranking_scores(row, cand_lengths, config.length_penalty)
        best = max(range(len(ranked)), key=lambda i: ranked[i])
        if config.strategy == "best_vs_worst":
            other = min(range(len(ranked)), key=lambda i: ranked[i])
        else:
            other = rng.choice([i for i in range(len(ranked)) if i != best])
        margin = ranked[best] - ranked[other]
        if margin <= 0 or cands[best] == cands[other]:
            result.dropped_ties += 1
            continue
        if margin < config.min_margin:
            result.dropped_below_margin += 1
            continue
        pair = {
            "prompt": list(prompt),
            "chosen": [{"role": "assistant", "content": cands[best]}],
            "rejected": [{"role": "assistant", "content": cands[other]}],
            "score_chosen": float(row[best]),
            "score_rejected": float(row[other]),
            "margin": float(margin),
            "prompt_index": int(prompt_indices[n]) if prompt_indices is not None else n,
            "chosen_length": int(cand_lengths[best]),
            "rejected_length": int(cand_lengths[other]),
        }
        if win_prob is not None:
            matrix = win_prob[n]
            pair["p_win"] = sum(matrix[best]) / len(matrix[best])
            pair["p_lose"] = sum(matrix[other]) / len(matrix[other])
        result.rows.append(pair)
    return result


def select_best(prompts: Sequence[Messages], candidates: Sequence[Sequence[str]],
                scores: Sequence[Sequence[float]], config: PairingConfig,
                prompt_indices: Sequence[int] | None = None,
                lengths: Sequence[Sequence[int]] | None = None) -> PairingResult:
    """Best-of-N: per prompt the best-ranked candidate, as an SFT target (rejection sampling)."""
    result = PairingResult(kind="best")
    for n, (prompt, cands, row) in enumerate(zip(prompts, candidates, scores, strict=True)):
        cand_lengths = _lengths(cands, lengths[n] if lengths is not None else None)
        ranked = ranking_scores(row, cand_lengths, config.length_penalty)
        best = max(range(len(ranked)), key=lambda i: ranked[i])
        margin = ranked[best] - min(ranked)
        if margin <= 0 or not cands[best].strip():
            result.dropped_ties += 1
            continue
        if margin < config.min_margin:
            result.dropped_below_margin += 1
            continue
        result.rows.append({
            "prompt": list(prompt),
            "completion": [{"role": "assistant", "content": cands[best]}],
            "score": float(row[best]),
            "prompt_index": int(prompt_indices[n]) if prompt_indices is not None else n,
            "completion_length": int(cand_lengths[best]),
        })
    return result


def save_pairs(result: PairingResult, out_dir: Path) -> None:
    """Write the rows as a `datasets.Dataset` (save_to_disk) plus the kept/dropped counts."""
    import json

    from datasets import Dataset

    if result.rows:
        columns = list(result.rows[0])
        data = {c: [r[c] for r in result.rows] for c in columns}
    else:
        data = {"prompt": [], "prompt_index": []}
    Dataset.from_dict(data).save_to_disk(str(out_dir))
    (out_dir / PAIR_STATS_FILE).write_text(json.dumps(result.stats()))


def load_pairs(pairs_dir: Path) -> Any:
    """The saved rows, in memory: the trainer's `map`/`select` calls then never write cache files into
    the committed pairs directory (an artifact stays as its stage wrote it), and skip that disk I/O.
    A round's pairs are text, small next to the model being trained."""
    from datasets import load_from_disk

    return load_from_disk(str(pairs_dir), keep_in_memory=True)


def load_pair_stats(pairs_dir: Path) -> dict[str, int]:
    import json

    return json.loads((pairs_dir / PAIR_STATS_FILE).read_text())
