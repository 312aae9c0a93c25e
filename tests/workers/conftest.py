"""Fixtures shared by the worker tests."""

from __future__ import annotations

import pytest

from workers.pipeline.pair import PairingConfig, build_pairs
from workers.tiny_models import synthetic_prompts


@pytest.fixture(scope="module")
def pairs():
    """Eight DPO pairs in TRL's conversational format: liked words chosen over plain ones."""
    from datasets import Dataset

    prompts = synthetic_prompts(8, seed=2)
    candidates = [["kind warm calm gentle", "the old red clock"] for _ in prompts]
    result = build_pairs(prompts, candidates, [[1.0, 0.0]] * len(prompts), PairingConfig())
    return Dataset.from_list(result.rows)
