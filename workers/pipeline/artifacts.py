"""Every artifact path of a job, derived from the job id and round only, and atomic writes.

Layout under `<artifact_root>/<job_id>/`:

    split.json                      prompt split (seeded), written once per job
    base-eval.jsonl                 base model's held-out samples (+ scalar rewards), cached per job
    round-<n>/generations.jsonl     K completions per training prompt
    round-<n>/scores.jsonl          per-candidate scores and the K x K win-probability matrix
    round-<n>/pairs/                HF dataset: TRL conversational preference pairs, or prompt-completion
                                    rows of the best answers (rejection sampling)
    round-<n>/model/                LoRA adapter or full model (safetensors) + tokenizer
    round-<n>/eval.jsonl            held-out samples of the new policy with their outcomes
    round-<n>/metrics.json          the round's metrics, written last
    round-<n>/stats/<stage>.json    a stage's own measurements, written just before its output

A file or directory at its final path is complete: writers fill `<name>.tmp-<random>` and rename,
so a process killed mid-write leaves only a temp path, which the next run removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")
TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class RoundPaths:
    round_dir: Path

    @property
    def generations(self) -> Path:
        return self.round_dir / "generations.jsonl"

    @property
    def scores(self) -> Path:
        return self.round_dir / "scores.jsonl"

    @property
    def pairs(self) -> Path:
        return self.round_dir / "pairs"

    @property
    def model(self) -> Path:
        return self.round_dir / "model"

    @property
    def eval_samples(self) -> Path:
        return self.round_dir / "eval.jsonl"

    @property
    def metrics(self) -> Path:
        return self.round_dir / "metrics.json"

    @property
    def trainer_scratch(self) -> Path:
        return self.round_dir / "trainer-scratch"

    def stage_stats(self, stage: str) -> Path:
        return self.round_dir / "stats" / f"{stage}.json"


def job_dir(artifact_root: Path, job_id: str) -> Path:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} is not a safe directory name")
    return Path(artifact_root) / job_id


def split_path(artifact_root: Path, job_id: str) -> Path:
    return job_dir(artifact_root, job_id) / "split.json"


def base_eval_path(artifact_root: Path, job_id: str) -> Path:
    return job_dir(artifact_root, job_id) / "base-eval.jsonl"


def round_paths(artifact_root: Path, job_id: str, round_index: int) -> RoundPaths:
    if round_index < 1:
        raise ValueError("rounds are numbered from 1")
    return RoundPaths(job_dir(artifact_root, job_id) / f"round-{round_index}")


def _tmp_sibling(final: Path, *, directory: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{final.name}{TMP_MARKER}"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_sibling(path, directory=False)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temp directory; on success it replaces `final` in one rename."""
    tmp = _tmp_sibling(final, directory=True)
    try:
        yield tmp
        if final.exists():  # only reachable when a caller forces a redo of a completed stage
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete what a killed writer left behind (`*.tmp-*`); returns what was removed."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if TMP_MARKER in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
