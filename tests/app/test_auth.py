from __future__ import annotations

import pytest

from app.db.models import ApiKey
from app.db.session import session_scope
from tests.app.helpers import assert_envelope, create_job, upload


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_missing_or_bad_key_answers_401(api, header):
    headers = {"Authorization": header} if header is not None else {}
    response = api.http.get("/v1/jobs", headers=headers)
    error = assert_envelope(response, 401)
    assert error["type"] == "authentication_error"


def test_keys_are_stored_hashed(api):
    with session_scope() as session:
        hashes = [k.key_hash for k in session.query(ApiKey).all()]
    assert hashes and api.key not in hashes and all(len(h) == 64 for h in hashes)


def test_other_tenants_resources_answer_404(api, other_api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/jobs/{job['id']}/rounds",
                 f"/v1/prompt-sets/{prompt_set['id']}"):
        assert_envelope(api.http.get(path, headers=other_api.headers()), 404)
        assert api.http.get(path, headers=api.headers()).status_code == 200
    assert_envelope(api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=other_api.headers()), 404)
    assert_envelope(api.http.delete(f"/v1/prompt-sets/{prompt_set['id']}", headers=other_api.headers()), 404)
    # Nor can another tenant start a job on this tenant's prompt set.
    assert_envelope(create_job(api, prompt_set["id"], key=other_api.key), 400, "prompt_set_not_found")
    assert api.http.get("/v1/jobs", headers=other_api.headers()).json()["data"] == []
    assert api.http.get("/v1/prompt-sets", headers=other_api.headers()).json()["data"] == []


def test_me_shows_tenant_and_webhook_secret(api):
    body = api.http.get("/v1/me", headers=api.headers()).json()
    assert body["name"] == "acme" and body["webhook_secret"].startswith("whsec_")
