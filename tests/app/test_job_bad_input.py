"""Every bad job body answers 4xx in the envelope, writes nothing, and never 500."""

from __future__ import annotations

import pytest

from app.db.models import Job, JobEvent
from tests.app.helpers import assert_envelope, count_rows, upload

BASE = {"base_model": "tiny-mistral", "reward_model": {"type": "scalar", "model": "tiny-rm"}}

BAD_BODIES = [
    ("unknown top-level field", {"temperature": 0.5}, "unknown_field", "temperature"),
    ("unknown nested field", {"training": {"learning_rate": 1e-6, "lr": 2}}, "unknown_field", "training.lr"),
    ("unknown reward type", {"reward_model": {"type": "gpt-judge", "model": "x"}}, "invalid_value", None),
    ("unknown algorithm type", {"algorithm": {"type": "ppo"}}, "invalid_value", None),
    ("zero rounds", {"rounds": 0}, "invalid_value", "rounds"),
    ("too many rounds", {"rounds": 21}, "invalid_value", "rounds"),
    ("dotdot model", {"base_model": "../etc/passwd"}, "invalid_value", "base_model"),
    ("dotdot inside", {"base_model": "org/../../x"}, "invalid_value", "base_model"),
    ("absolute path", {"base_model": "/models/mistral"}, "invalid_value", "base_model"),
    ("absolute reward path", {"reward_model": {"type": "scalar", "model": "/srv/rm"}}, "invalid_value", None),
    ("home path", {"base_model": "~/model"}, "invalid_value", "base_model"),
    ("nul in model", {"base_model": "tiny\u0000"}, "invalid_value", None),
    ("nul in metadata", {"metadata": {"note": "a\u0000b"}}, "invalid_value", None),
    ("nul in metadata key", {"metadata": {"a\u0000": "b"}}, "invalid_value", None),
    ("negative beta", {"algorithm": {"type": "dpo", "beta": -1}}, "invalid_value", None),
    ("eval fraction one", {"eval_fraction": 1.0}, "invalid_value", "eval_fraction"),
    ("prompt length over max", {"training": {"max_length": 64, "max_prompt_length": 64}}, "invalid_value", None),
    ("wrong type", {"rounds": "three"}, "invalid_value", "rounds"),
    ("webhook not http", {"webhook_url": "ftp://example.com/hook"}, "invalid_value", "webhook_url"),
]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
@pytest.mark.parametrize(("case", "override", "code", "param"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_job_bodies(api, case, override, code, param):
    prompt_set = upload(api).json()
    body = {**BASE, "prompt_set": prompt_set["id"], **override}
    error = assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 422, code)
    if param is not None:
        assert error["param"] == param
    assert count_rows(Job) == 0 and count_rows(JobEvent) == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'"x"', b"\xff\xfe", b""], ids=["syntax", "list", "string",
                                                                                      "binary", "empty"])
def test_unparseable_bodies(api, raw):
    response = api.http.post("/v1/jobs", content=raw,
                             headers={**api.headers(), "content-type": "application/json"})
    assert_envelope(response, 422)
    assert count_rows(Job) == 0


def test_unknown_prompt_set(api):
    body = {**BASE, "prompt_set": "ps_doesnotexist"}
    assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 400, "prompt_set_not_found")
    assert count_rows(Job) == 0


def test_body_over_the_size_limit_answers_413(api):
    prompt_set = upload(api).json()
    body = {**BASE, "prompt_set": prompt_set["id"], "metadata": {"blob": "x" * (2 * 1024 * 1024)}}
    assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 413, "payload_too_large")
    assert count_rows(Job) == 0


def test_body_over_the_limit_without_content_length_answers_413(api):
    prompt_set = upload(api).json()

    def chunks():
        yield b'{"base_model": "tiny-mistral", "prompt_set": "' + prompt_set["id"].encode() + b'", "metadata": {"x": "'
        for _ in range(64):
            yield b"y" * 32768
        yield b'"}}'

    response = api.http.post("/v1/jobs", content=chunks(),
                             headers={**api.headers(), "content-type": "application/json"})
    assert_envelope(response, 413, "payload_too_large")
    assert count_rows(Job) == 0


def test_unknown_route_and_method_use_the_envelope(api):
    assert_envelope(api.http.get("/v1/nothing", headers=api.headers()), 404)
    assert_envelope(api.http.put("/v1/jobs", headers=api.headers()), 405)


def test_judge_endpoint_outside_the_allowlist_answers_422(api, monkeypatch):
    from tests.conftest import reset_caches

    prompt_set = upload(api).json()
    judge = {"type": "judge", "model": "judge-model", "judge": {"endpoint": "http://judge.internal:8000/v1"}}
    body = {**BASE, "prompt_set": prompt_set["id"], "reward_model": judge}
    error = assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 422,
                            "judge_endpoint_not_allowed")
    assert error["param"] == "reward_model.judge.endpoint"
    assert count_rows(Job) == 0
    monkeypatch.setenv("ALIGND_JUDGE_ENDPOINT_ALLOWLIST", '["http://judge.internal:8000/v1"]')
    reset_caches()
    response = api.http.post("/v1/jobs", json=body, headers=api.headers())
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("url", ["/v1/jobs?after=%00", "/v1/jobs/job_%00", "/v1/prompt-sets/ps%00x",
                                 "/v1/jobs?status=running%00"])
def test_nul_in_the_url_answers_422(api, url):
    assert_envelope(api.http.get(url, headers=api.headers()), 422, "nul_byte")


def test_lora_rank_above_what_vllm_serves_answers_422(api, monkeypatch):
    from tests.conftest import reset_caches

    monkeypatch.setenv("ALIGND_VLLM_BASE_URLS", '{"tiny-mistral": "http://vllm:8000"}')
    reset_caches()
    prompt_set = upload(api).json()
    body = {**BASE, "prompt_set": prompt_set["id"], "training": {"lora": {"r": 128, "alpha": 128}}}
    error = assert_envelope(api.http.post("/v1/jobs", json=body, headers=api.headers()), 422,
                            "lora_rank_not_servable")
    assert error["param"] == "training.lora.r" and count_rows(Job) == 0
    body["training"] = {"lora": {"r": 64, "alpha": 64}}
    assert api.http.post("/v1/jobs", json=body, headers=api.headers()).status_code == 201
