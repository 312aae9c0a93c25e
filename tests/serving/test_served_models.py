"""Which model a name serves, against Postgres: the job's selected round, tenancy, readiness."""

from __future__ import annotations

import pytest

from app.core.errors import Conflict, NotFound
from app.core.security import new_id
from app.db.base import utcnow
from app.db.models import Job, JobRound, PromptSet, ServedModel
from app.db.session import session_scope
from app.services.served_models import ensure_registered
from app.services.tenants import get_or_create_tenant


def _job(session, tenant_name: str, *, status: str, rounds: list[tuple[int, dict]], method: str = "lora") -> Job:  # noqa: ANN001
    tenant = get_or_create_tenant(session, name=tenant_name)
    prompt_set = PromptSet(id=new_id("ps"), tenant_id=tenant.id, name="p", format="jsonl", num_prompts=1,
                           sha256="0" * 64)
    session.add(prompt_set)
    session.flush()
    job_id = new_id("job")
    name = f"ft:tiny-mistral:{tenant_name}::{job_id.removeprefix('job_')}" if status == "succeeded" else None
    job = Job(id=job_id, tenant_id=tenant.id, prompt_set_id=prompt_set.id, status=status, base_model="tiny-mistral",
              spec={"training": {"method": method}}, rounds=3, fine_tuned_model=name)
    session.add(job)
    session.flush()
    for number, metrics in rounds:
        session.add(JobRound(job_id=job.id, round=number, status="succeeded", metrics=metrics,
                             model_path=f"/artifacts/{job.id}/round-{number}/model", finished_at=utcnow()))
    session.flush()
    return job


def test_the_selected_round_is_served_else_the_last_one(backend):
    with session_scope() as session:
        best = _job(session, "acme", status="succeeded",
                    rounds=[(1, {"selected": False}), (2, {"selected": True}), (3, {"selected": False})])
        early = _job(session, "acme", status="succeeded", rounds=[(1, {}), (2, {})], method="full")
        names = best.fine_tuned_model, early.fine_tuned_model
        tenant_id = best.tenant_id
    with session_scope() as session:
        served = ensure_registered(session, name=names[0], tenant_id=tenant_id)
        assert served.model_path.endswith("round-2/model") and served.is_adapter
        again = ensure_registered(session, name=names[0], tenant_id=None)  # the model server's lookup
        assert again == served
        full = ensure_registered(session, name=names[1], tenant_id=tenant_id)
        assert full.model_path.endswith("round-2/model") and not full.is_adapter
    with session_scope() as session:
        assert session.query(ServedModel).count() == 2


def test_other_tenants_unknown_and_unfinished_models(backend):
    with session_scope() as session:
        mine = _job(session, "acme", status="succeeded", rounds=[(1, {})])
        running = _job(session, "acme", status="running", rounds=[])
        other = get_or_create_tenant(session, name="globex")
        name, running_id, acme_id, other_id = mine.fine_tuned_model, running.id, mine.tenant_id, other.id
    with session_scope() as session:
        with pytest.raises(NotFound):
            ensure_registered(session, name=name, tenant_id=other_id)
        with pytest.raises(NotFound):
            ensure_registered(session, name="tiny-mistral", tenant_id=acme_id)
        with pytest.raises(Conflict) as raised:
            ensure_registered(session, name=f"ft:tiny-mistral:acme::{running_id.removeprefix('job_')}",
                              tenant_id=acme_id)
        assert raised.value.headers == {"alignd-job-status": "running"} and "running" in raised.value.message
        with pytest.raises(NotFound):  # Postgres cannot store (or compare with) a NUL
            ensure_registered(session, name=f"{name}\x00", tenant_id=acme_id)
        with pytest.raises(NotFound):  # the right job, the wrong name
            ensure_registered(session, name=name.replace(":acme:", ":globex:"), tenant_id=acme_id)


def test_a_nul_in_a_model_name_never_reaches_the_database(api):
    # In the body: no such model (404). In the URL: refused before routing (422), like any NUL there.
    chat = api.http.post("/v1/chat/completions", headers=api.headers(), json={
        "model": "ft:tiny-mistral:acme::abc\x00", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    listed = api.http.get("/v1/models/ft:tiny-mistral%00", headers=api.headers())
    assert listed.status_code == 422 and listed.json()["error"]["code"] == "nul_byte"
    generate = api.http.post("/v1/models/%00/generate", headers=api.headers(), json={"inputs": "hi"})
    assert generate.status_code == 422 and generate.json()["error"]["code"] == "nul_byte"
