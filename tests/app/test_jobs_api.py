from __future__ import annotations

import pytest

from app.db.models import Job, JobEvent
from app.db.session import session_scope
from app.schemas.jobs import JobRead
from tests.app.helpers import assert_envelope, count_rows, create_job, upload
from tests.conftest import make_key


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_create_job_answers_the_job_object_with_defaults(api):
    prompt_set = upload(api).json()
    response = create_job(api, prompt_set["id"], suffix="first", metadata={"team": "search"})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["object"] == "alignment.job" and job["id"].startswith("job_")
    assert job["status"] == "validating"
    assert job["prompt_set"] == prompt_set["id"] and job["base_model"] == "tiny-mistral"
    assert job["rounds"] == 3 and job["samples_per_prompt"] == 5 and job["current_round"] == 0
    assert job["algorithm"] == {"type": "dpo", "beta": 0.1, "eta": None, "loss_type": "sigmoid",
                                "reference": "round_start", "label_smoothing": 0.0, "length_normalize": False}
    assert job["reward_model"]["type"] == "scalar" and job["reward_model"]["batch_size"] == 8
    assert job["reward_model"]["rules"] is None and job["reward_model"]["judge"] is None
    assert job["pairing"] == {"strategy": "best_vs_worst", "min_margin": 0.0, "length_penalty": 0.0}
    assert job["training"]["learning_rate"] == 5e-7 and job["training"]["lora"]["r"] == 16
    assert job["generation"] == {"max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9, "batch_size": 16}
    assert job["progress"] == {"phase": None, "fraction": 0.0}
    assert job["error"] is None and job["fine_tuned_model"] is None and job["finished_at"] is None
    assert job["metadata"] == {"team": "search"} and job["suffix"] == "first"
    assert api.http.get(f"/v1/jobs/{job['id']}", headers=api.headers()).json() == job
    assert JobRead.model_validate(job).model_dump(mode="json")["id"] == job["id"]
    events = api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.headers()).json()
    assert events["object"] == "list" and events["data"][0]["type"] == "job.created"
    assert set(events["data"][0]) == {"id", "object", "created_at", "level", "type", "message", "data"}


def test_list_jobs_paginates_and_filters(api):
    prompt_set = upload(api).json()
    ids = [create_job(api, prompt_set["id"]).json()["id"] for _ in range(5)]
    page = api.http.get("/v1/jobs", params={"limit": 2}, headers=api.headers()).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["data"]]
    while page["has_more"]:
        page = api.http.get("/v1/jobs", params={"limit": 2, "after": seen[-1]}, headers=api.headers()).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == ids[::-1]
    api.http.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.headers())
    cancelled = api.http.get("/v1/jobs", params={"status": "cancelled"}, headers=api.headers()).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    assert_envelope(api.http.get("/v1/jobs", params={"status": "bogus"}, headers=api.headers()), 422)
    assert_envelope(api.http.get("/v1/jobs", params={"limit": 0}, headers=api.headers()), 422)


def test_cancel_a_queued_job_at_once(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    cancelled = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers()).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    types = [e["type"] for e in api.http.get(f"/v1/jobs/{job['id']}/events", headers=api.headers()).json()["data"]]
    assert types == ["job.created", "job.cancelled"]


def test_cancel_a_running_job_asks_the_worker(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    with session_scope() as session:
        session.get(Job, job["id"]).status = "running"
    response = api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers()).json()
    assert response["status"] == "running"
    with session_scope() as session:
        assert session.get(Job, job["id"]).cancel_requested is True


def test_cancel_a_finished_job_conflicts(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    with session_scope() as session:
        session.get(Job, job["id"]).status = "succeeded"
    assert_envelope(api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers()), 409,
                    "job_not_cancellable")


def test_events_paginate_with_after(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    from app.services.events import add_event

    with session_scope() as session:
        for i in range(5):
            add_event(session, job_id=job["id"], type="test.event", message=f"event {i}")
    first = api.http.get(f"/v1/jobs/{job['id']}/events", params={"limit": 3}, headers=api.headers()).json()
    assert len(first["data"]) == 3 and first["has_more"]
    rest = api.http.get(f"/v1/jobs/{job['id']}/events", params={"after": first["data"][-1]["id"]},
                        headers=api.headers()).json()
    assert len(rest["data"]) == 3 and not rest["has_more"]
    assert [e["id"] for e in first["data"] + rest["data"]] == sorted({e["id"] for e in first["data"] + rest["data"]})


def test_event_stream_ends_when_the_job_ends(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    with api.http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"stream": "true"},
                         headers=api.headers()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    assert text.count("event: job.event") == 2
    assert 'event: end\ndata: {"status": "cancelled"}' in text
    first_id = text.split("id: ", 1)[1].split("\n", 1)[0]
    with api.http.stream("GET", f"/v1/jobs/{job['id']}/events", params={"stream": "true"},
                         headers=api.headers(**{"Last-Event-ID": first_id})) as response:
        resumed = "".join(response.iter_text())
    assert resumed.count("event: job.event") == 1 and f"id: {first_id}\n" not in resumed


def test_rounds_list_is_empty_before_the_job_runs(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    body = api.http.get(f"/v1/jobs/{job['id']}/rounds", headers=api.headers()).json()
    assert body == {"object": "list", "data": [], "has_more": False}


def test_same_idempotency_key_replays_the_first_answer(api):
    prompt_set = upload(api).json()
    first = create_job(api, prompt_set["id"], headers={"Idempotency-Key": "k-1"})
    second = create_job(api, prompt_set["id"], headers={"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert count_rows(Job) == 1
    other = create_job(api, prompt_set["id"], headers={"Idempotency-Key": "k-1"}, rounds=2)
    assert_envelope(other, 422, "idempotency_key_reused")
    assert count_rows(Job) == 1
    # Keys are per tenant.
    other_tenant_key = make_key("initech")
    foreign = upload(api, key=other_tenant_key).json()
    assert create_job(api, foreign["id"], key=other_tenant_key,
                      headers={"Idempotency-Key": "k-1"}).status_code == 201
    assert count_rows(Job) == 2


def test_prompt_set_upload_is_idempotent(api):
    from app.db.models import PromptSet

    first = upload(api, headers={"Idempotency-Key": "up-1"})
    second = upload(api, headers={"Idempotency-Key": "up-1"})
    assert first.json() == second.json() and count_rows(PromptSet) == 1
    assert_envelope(upload(api, b'{"prompt": "different"}', headers={"Idempotency-Key": "up-1"}), 422,
                    "idempotency_key_reused")


def test_idempotency_keys_live_a_day(api):
    from datetime import timedelta

    from app.db.base import utcnow
    from app.db.models import IdempotencyRecord

    prompt_set = upload(api).json()
    create_job(api, prompt_set["id"], headers={"Idempotency-Key": "ttl"})
    with session_scope() as session:
        record = session.query(IdempotencyRecord).filter_by(key="ttl").one()
        assert record.expires_at - utcnow() > timedelta(hours=23, minutes=59)


def test_job_creation_enqueues_validation_after_commit(api):
    """The validate task is on the Redis broker, naming a job that is already committed."""
    import json

    import redis

    from app.core.config import get_settings

    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    client = redis.Redis.from_url(get_settings().broker_url)
    messages = [json.loads(m) for m in client.lrange("default", 0, -1)]
    assert any(m["headers"]["task"] == "alignd.validate_job" and job["id"] in m["headers"]["argsrepr"]
               for m in messages)
    assert count_rows(JobEvent) >= 1
