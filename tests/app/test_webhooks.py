from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import redis

from app.core.config import get_settings
from app.core.security import verify_signature
from app.db.models import JobEvent
from app.db.session import session_scope
from tests.app.helpers import create_job, upload


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.calls) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _cancelled_job_with_hook(api, url: str) -> dict:
    prompt_set = upload(api).json()
    job = create_job(api, prompt_set["id"], webhook_url=url).json()
    api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=api.headers())
    return job


def test_ending_a_job_enqueues_its_webhook_instead_of_sending_it(api, receiver):
    job = _cancelled_job_with_hook(api, receiver.url)
    assert receiver.calls == []
    queued = [json.loads(m) for m in redis.Redis.from_url(get_settings().broker_url).lrange("default", 0, -1)]
    hooks = [m for m in queued if m["headers"]["task"] == "alignd.deliver_webhook"]
    assert len(hooks) == 1 and job["id"] in hooks[0]["headers"]["argsrepr"]
    assert "alignment.job.cancelled" in hooks[0]["headers"]["argsrepr"]


def test_webhook_is_signed_and_delivered(api, receiver):
    from workers.tasks.webhooks import deliver_webhook

    job = _cancelled_job_with_hook(api, receiver.url)
    deliver_webhook.apply(args=[job["id"], "alignment.job.cancelled"]).get()
    assert len(receiver.calls) == 1
    headers, body = receiver.calls[0]
    payload = json.loads(body)
    assert payload["type"] == "alignment.job.cancelled" and payload["data"]["id"] == job["id"]
    assert payload["data"]["status"] == "cancelled"
    secret = api.http.get("/v1/me", headers=api.headers()).json()["webhook_secret"]
    assert verify_signature(secret, headers["alignd-signature"], body)
    assert not verify_signature(secret, headers["alignd-signature"], body + b" ")
    assert not verify_signature("whsec_other", headers["alignd-signature"], body)
    with session_scope() as session:
        types = [e.type for e in session.query(JobEvent).filter_by(job_id=job["id"])]
    assert "webhook.delivered" in types


def test_webhook_retries_with_backoff_then_gives_up(api, monkeypatch):
    from workers.tasks import webhooks

    failing = Receiver(fail_first=100)
    try:
        monkeypatch.setattr(webhooks, "get_settings", lambda: get_settings().model_copy(
            update={"webhook_max_retries": 2}))
        countdowns = []
        real_retry = webhooks.deliver_webhook.retry

        def recording_retry(*args, **kwargs):
            countdowns.append(kwargs.get("countdown"))
            return real_retry(*args, **kwargs)

        monkeypatch.setattr(webhooks.deliver_webhook, "retry", recording_retry)
        job = _cancelled_job_with_hook(api, failing.url)
        webhooks.deliver_webhook.apply(args=[job["id"], "alignment.job.cancelled"])
        assert len(failing.calls) == 3
        assert [h["alignd-delivery-attempt"] for h, _ in failing.calls] == ["1", "2", "3"]
        assert countdowns == [2, 4]
        with session_scope() as session:
            failed = session.query(JobEvent).filter_by(job_id=job["id"], type="webhook.failed").all()
        assert len(failed) == 1 and "3 attempts" in failed[0].message
    finally:
        failing.close()


def test_webhook_retried_after_a_transient_failure(api):
    from workers.tasks.webhooks import deliver_webhook

    flaky = Receiver(fail_first=1)
    try:
        job = _cancelled_job_with_hook(api, flaky.url)
        deliver_webhook.apply(args=[job["id"], "alignment.job.cancelled"])
        assert len(flaky.calls) == 2
        with session_scope() as session:
            delivered = session.query(JobEvent).filter_by(job_id=job["id"], type="webhook.delivered").one()
        assert delivered.data["attempts"] == 2
    finally:
        flaky.close()
