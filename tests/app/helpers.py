from __future__ import annotations

import json
from typing import Any

PROMPTS = [f"Write a short note about topic number {i}." for i in range(12)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def upload(api, data: bytes | None = None, filename: str = "prompts.jsonl", name: str | None = None,
           headers: dict[str, str] | None = None, key: str | None = None):
    data = data if data is not None else jsonl([{"prompt": p} for p in PROMPTS])
    form = {"name": name} if name is not None else {}
    auth = {"Authorization": f"Bearer {key or api.key}"}
    return api.http.post("/v1/prompt-sets", files={"file": (filename, data)}, data=form,
                         headers={**auth, **(headers or {})})


def create_job(api, prompt_set_id: str, key: str | None = None, headers: dict[str, str] | None = None,
               **fields: Any):
    body = {"base_model": "tiny-mistral", "prompt_set": prompt_set_id,
            "reward_model": {"type": "scalar", "model": "tiny-rm"}, **fields}
    auth = {"Authorization": f"Bearer {key or api.key}"}
    return api.http.post("/v1/jobs", json=body, headers={**auth, **(headers or {})})


def assert_envelope(response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def count_rows(model) -> int:
    from sqlalchemy import func, select

    from app.db.session import session_scope

    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(model))
