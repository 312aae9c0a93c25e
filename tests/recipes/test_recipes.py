"""Every recipe in recipes/ is a valid job body (the same JobSpec classes parse it) once the CLI adds
the base model and prompt set, and `alignd jobs create --recipe` merges it with the flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from alignd.client_commands import RECIPES_DIR, ApiError, build_job_body, load_recipe, recipe_names
from app.schemas.job_spec import JobCreate

SEED_RECIPES = {"snorkel-pairrm-dpo", "sppo", "merlinite-rejection-sampling", "starling-scalar-rm"}


def _args(**flags) -> argparse.Namespace:
    defaults = dict(recipe=None, body=None, base_model=None, prompt_set=None, rounds=None, samples_per_prompt=None,
                    suffix=None, reward_model=None, reward_type=None, algorithm=None)
    return argparse.Namespace(**{**defaults, **flags})


def test_one_recipe_per_seed_recipe():
    assert set(recipe_names()) == SEED_RECIPES


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_is_a_valid_job_body(name):
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    assert "base_model" not in raw and "prompt_set" not in raw  # the CLI's flags supply them
    job = JobCreate.model_validate({**raw, "base_model": "mistralai/Mistral-7B-Instruct-v0.2",
                                    "prompt_set": "ps_recipe"})
    assert job.rounds >= 1 and job.selection in ("best", "last")


def test_recipes_carry_their_seeds_hyperparameters():
    sppo = JobCreate.model_validate({**load_recipe("sppo"), "base_model": "a/b", "prompt_set": "ps"})
    assert sppo.algorithm.type == "sppo" and sppo.algorithm.beta == pytest.approx(1e-3)
    assert (sppo.samples_per_prompt, sppo.rounds, sppo.generation.temperature, sppo.training.learning_rate) == (
        5, 3, 0.7, 5e-7)
    merlinite = load_recipe("merlinite-rejection-sampling")
    assert merlinite["algorithm"]["type"] == "rejection_sampling" and merlinite["reward_model"]["type"] == "implicit"
    assert load_recipe("snorkel-pairrm-dpo")["reward_model"]["type"] == "pairrm"
    assert load_recipe("starling-scalar-rm")["reward_model"]["type"] == "scalar"


def test_cli_merges_recipe_body_file_and_flags(tmp_path: Path):
    body_file = tmp_path / "body.json"
    body_file.write_text('{"reward_model": {"batch_size": 2}, "rounds": 2}')
    body = build_job_body(_args(recipe="sppo", body=body_file, base_model="org/base", prompt_set="ps_1",
                                rounds=1, suffix="x"))
    assert body["reward_model"] == {"type": "pairrm", "model": "llm-blender/PairRM", "batch_size": 2}
    assert body["rounds"] == 1 and body["algorithm"]["eta"] == 1000 and body["base_model"] == "org/base"
    JobCreate.model_validate(body)
    own = tmp_path / "mine.yaml"
    own.write_text("rounds: 2\nalgorithm: {type: ipo}\n")
    assert build_job_body(_args(recipe=str(own), algorithm="dpo"))["algorithm"] == {"type": "dpo"}
    with pytest.raises(ApiError, match="no recipe"):
        build_job_body(_args(recipe="no-such-recipe"))
