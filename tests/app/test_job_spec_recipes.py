"""The job body's recipe fields: algorithm and reward types, their cross-field rules (answered 422 in
the error envelope by the API), and the defaults they add."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.db.models import Job
from app.schemas.job_spec import JobCreate, JobSpec
from tests.app.helpers import assert_envelope, count_rows, upload

BASE = {"base_model": "tiny-mistral", "prompt_set": "ps"}
JUDGE = {"type": "judge", "model": "judge-model", "judge": {"endpoint": "http://judge:8000/v1"}}

BAD = [
    ("ipo with another loss", {"algorithm": {"type": "ipo", "loss_type": "hinge"}}),
    ("sppo with a DPO loss", {"algorithm": {"type": "sppo", "loss_type": "robust"}}),
    ("eta outside sppo", {"algorithm": {"type": "dpo", "eta": 100}}),
    ("eta and beta disagree", {"algorithm": {"type": "sppo", "eta": 100, "beta": 0.1}}),
    ("length_normalize with hinge", {"algorithm": {"type": "dpo", "loss_type": "hinge", "length_normalize": True}}),
    ("rejection sampling with a pairing strategy", {"algorithm": {"type": "rejection_sampling"},
                                                    "pairing": {"strategy": "best_vs_random"}}),
    ("scalar without a model", {"reward_model": {"type": "scalar"}}),
    ("implicit without a reference", {"reward_model": {"type": "implicit", "model": "a/instruct"}}),
    ("reference on scalar", {"reward_model": {"type": "scalar", "model": "rm", "reference_model": "b"}}),
    ("rules without rules", {"reward_model": {"type": "rules"}}),
    ("empty rules", {"reward_model": {"type": "rules", "rules": {}}}),
    ("bad regex", {"reward_model": {"type": "rules", "rules": {"must_match": ["(unclosed"]}}}),
    ("regex too long", {"reward_model": {"type": "rules", "rules": {"must_match": ["a" * 201]}}}),
    ("min over max words", {"reward_model": {"type": "rules", "rules": {"min_words": 9, "max_words": 3}}}),
    ("weights without rules", {"reward_model": {"type": "pairrm", "weights": {"model": 1, "rules": 2}}}),
    ("judge without settings", {"reward_model": {"type": "judge", "model": "j"}}),
    ("judge endpoint not http", {"reward_model": {**JUDGE, "judge": {"endpoint": "file:///etc/passwd"}}}),
    ("judge template without answers", {"reward_model": {**JUDGE, "judge": {"endpoint": "http://j/v1",
                                                                             "prompt_template": "{prompt}"}}}),
    ("judge model as a path", {"reward_model": {**JUDGE, "model": "../judge"}}),
    ("negative length penalty", {"pairing": {"length_penalty": -0.1}}),
    ("unknown selection", {"selection": "median"}),
    ("zero patience", {"early_stopping": {"patience": 0}}),
]


@pytest.mark.parametrize(("case", "override"), BAD, ids=[c[0] for c in BAD])
def test_contradictory_recipe_fields_are_refused(case, override):
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**BASE, **override})


def test_types_fix_their_trl_loss_and_eta_sets_beta():
    assert JobSpec.model_validate({**BASE, "algorithm": {"type": "ipo"}}).algorithm.loss_type == "ipo"
    assert JobSpec.model_validate({**BASE, "algorithm": {"type": "sppo_hard"}}).algorithm.loss_type == "sppo_hard"
    sppo = JobSpec.model_validate({**BASE, "algorithm": {"type": "sppo", "eta": 1000}})
    assert sppo.algorithm.beta == pytest.approx(1e-3)
    assert JobSpec.model_validate(sppo.model_dump(mode="json")) == sppo  # what the worker reads back


def test_new_fields_have_documented_defaults():
    spec = JobSpec.model_validate(BASE)
    assert spec.reward_model.model == "llm-blender/PairRM"  # pairrm's default model
    assert spec.selection == "best" and spec.early_stopping is None and spec.length_growth_warning == 0.2
    assert spec.pairing.length_penalty == 0.0 and spec.algorithm.length_normalize is False
    rules = JobSpec.model_validate({**BASE, "reward_model": {"type": "rules", "rules": {"max_words": 200}}})
    assert rules.reward_model.model is None and rules.reward_model.rules.length_penalty == 0.05
    judge = JobSpec.model_validate({**BASE, "reward_model": JUDGE}).reward_model.judge
    assert judge.temperature == 0.0 and all(p in judge.prompt_template for p in ("{prompt}", "{answer_a}"))


@pytest.mark.parametrize("override", [
    {"algorithm": {"type": "sppo", "loss_type": "hinge"}},
    {"reward_model": {"type": "rules", "rules": {"must_not_match": ["[z-a]"]}}},
], ids=["sppo-loss", "bad-regex"])
def test_the_api_answers_422_in_the_envelope(api, override):
    prompt_set = upload(api).json()
    body = {**BASE, "prompt_set": prompt_set["id"], **override}
    assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 422, "invalid_value")
    assert count_rows(Job) == 0


def test_a_rules_job_is_accepted(api):
    prompt_set = upload(api).json()
    body = {**BASE, "prompt_set": prompt_set["id"], "algorithm": {"type": "sppo", "eta": 10},
            "reward_model": {"type": "rules", "rules": {"must_not_match": ["(?i)buy (stocks|shares)"]}},
            "early_stopping": {"patience": 2}}
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["algorithm"]["type"] == "sppo" and job["algorithm"]["beta"] == pytest.approx(0.1)
    assert job["reward_model"]["rules"]["must_not_match"] == ["(?i)buy (stocks|shares)"]
    with pytest.raises(ValidationError):
        JobCreate.model_validate({**body, "reward_model": {"type": "rules"}})
