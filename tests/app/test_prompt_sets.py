from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.db.models import PromptSet
from app.db.session import session_scope
from tests.app.helpers import assert_envelope, count_rows, create_job, jsonl, upload


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_upload_jsonl_prompt_and_messages(api):
    data = jsonl([{"prompt": "Hello there"},
                  {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    response = upload(api, data, name="greetings")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["object"] == "prompt_set" and body["name"] == "greetings" and body["num_prompts"] == 2
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    with session_scope() as session:
        stored = session.get(PromptSet, body["id"]).prompts
    assert stored[0] == [{"role": "user", "content": "Hello there"}]
    assert stored[1][0]["role"] == "system" and stored[1][-1] == {"role": "user", "content": "Hi"}
    listed = api.http.get("/v1/prompt-sets", headers=api.headers()).json()
    assert [p["id"] for p in listed["data"]] == [body["id"]]
    assert api.http.get(f"/v1/prompt-sets/{body['id']}", headers=api.headers()).json() == body


def test_upload_csv(api):
    data = b'prompt,other\n"Tell me, briefly, a story",x\nWhat is DPO?,y\n'
    body = upload(api, data, filename="p.csv").json()
    assert body["num_prompts"] == 2 and body["format"] == "csv"


def test_upload_parquet(api):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["one", "two", "three"]}), buffer)
    body = upload(api, buffer.getvalue(), filename="p.parquet").json()
    assert body["num_prompts"] == 3 and body["format"] == "parquet"


def test_delete_prompt_set_conflicts_while_a_job_uses_it(api):
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"]).json()
    assert_envelope(api.http.delete(f"/v1/prompt-sets/{prompt_set['id']}", headers=api.headers()), 409,
                    "prompt_set_in_use")
    api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    response = api.http.delete(f"/v1/prompt-sets/{prompt_set['id']}", headers=api.headers())
    assert response.status_code == 200 and response.json()["deleted"] is True
    assert_envelope(api.http.get(f"/v1/prompt-sets/{prompt_set['id']}", headers=api.headers()), 404)
    # The finished job still names its prompt set.
    assert api.http.get(f"/v1/jobs/{job['id']}", headers=api.headers()).json()["prompt_set"] == prompt_set["id"]


BAD_FILES = [
    ("malformed line", jsonl([{"prompt": "ok"}]) + b"\n{not json}\n", "p.jsonl", "malformed_jsonl", "line 2"),
    ("empty", b"", "p.jsonl", "empty_prompt_set", None),
    ("blank lines only", b"\n\n  \n", "p.jsonl", "empty_prompt_set", None),
    ("nul byte", b'{"prompt": "a\x00b"}\n', "p.jsonl", "nul_byte", None),
    ("escaped nul", b'{"prompt": "a\\u0000b"}\n', "p.jsonl", "nul_byte", None),
    ("not utf-8", b'{"prompt": "caf\xe9"}\n', "p.jsonl", "invalid_encoding", None),
    ("no prompt field", b'{"text": "x"}\n', "p.jsonl", "invalid_file", "line 1"),
    ("empty prompt", b'{"prompt": "   "}\n', "p.jsonl", "invalid_file", "line 1"),
    ("bad role", b'{"messages": [{"role": "robot", "content": "x"}]}\n', "p.jsonl", "invalid_file", None),
    ("assistant last", b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "p.jsonl", "invalid_file", None),
    ("array line", b'["x"]\n', "p.jsonl", "invalid_file", "line 1"),
    ("csv without prompt column", b"text\nhello\n", "p.csv", "invalid_file", None),
    ("bad parquet", b"PAR1 this is not parquet", "p.parquet", "invalid_file", None),
]


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
@pytest.mark.parametrize(("case", "data", "filename", "code", "mentions"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_prompt_files_answer_422_and_write_nothing(api, case, data, filename, code, mentions):
    error = assert_envelope(upload(api, data, filename=filename), 422, code)
    if mentions:
        assert mentions in error["message"]
    assert count_rows(PromptSet) == 0


def test_upload_over_the_size_limit_answers_413(backend, monkeypatch):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_key, reset_caches

    monkeypatch.setenv("ALIGND_MAX_UPLOAD_BYTES", "2000")
    reset_caches()
    with TestClient(create_app()) as http:
        key = make_key("acme")
        big = jsonl([{"prompt": "x" * 100} for _ in range(50)])
        response = http.post("/v1/prompt-sets", files={"file": ("p.jsonl", big)},
                             headers={"Authorization": f"Bearer {key}"})
        assert_envelope(response, 413, "payload_too_large")
    assert count_rows(PromptSet) == 0


def test_name_with_nul_is_refused(api):
    assert_envelope(upload(api, name="bad\x00name"), 422)
    assert count_rows(PromptSet) == 0
