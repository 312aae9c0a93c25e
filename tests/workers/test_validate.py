"""The validate task's checks for the new reward types: models that must exist, and a judge endpoint
that must be in the service's allowlist (the worker checks it again before any request)."""

from __future__ import annotations

import pytest

from app.core.config import reset_settings_cache
from app.db.models import Job, PromptSet
from app.schemas.job_spec import JobSpec
from workers.tasks.validate import JobInvalid, check_job

JUDGE = {"type": "judge", "model": "judge-model", "judge": {"endpoint": "http://judge.internal:8000/v1"}}


@pytest.fixture
def settings_env(monkeypatch, tiny_models):
    monkeypatch.setenv("ALIGND_MODEL_ROOT", str(tiny_models.root))
    reset_settings_cache()
    yield monkeypatch
    monkeypatch.undo()
    reset_settings_cache()


def _check(reward: dict) -> None:
    spec = JobSpec.model_validate({"base_model": "tiny-mistral", "prompt_set": "ps", "reward_model": reward})
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(12)]
    check_job(Job(id="job_x", spec=spec.model_dump(mode="json")),
              PromptSet(id="ps", prompts=prompts, num_prompts=len(prompts)))


def test_judge_endpoints_must_be_allowlisted(settings_env):
    with pytest.raises(JobInvalid) as refused:
        _check(JUDGE)  # the default allowlist is empty: judges are off
    assert refused.value.code == "judge_endpoint_not_allowed"
    settings_env.setenv("ALIGND_JUDGE_ENDPOINT_ALLOWLIST", '["http://judge.internal:8000/v1"]')
    reset_settings_cache()
    _check(JUDGE)
    with pytest.raises(JobInvalid):
        _check({**JUDGE, "judge": {"endpoint": "http://judge.internal:8000/v1.evil"}})


def test_implicit_models_must_exist_and_rules_need_none(settings_env, tiny_models):
    _check({"type": "implicit", "model": tiny_models.policy_liked, "reference_model": tiny_models.policy})
    with pytest.raises(JobInvalid) as missing:
        _check({"type": "implicit", "model": tiny_models.policy_liked, "reference_model": "no-such-base"})
    assert missing.value.code == "model_not_found" and "reference_model" in missing.value.message
    _check({"type": "rules", "rules": {"max_words": 100}})
