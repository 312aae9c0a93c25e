"""Signed webhook delivery with retries and backoff, on the default queue."""

from __future__ import annotations

import json
import logging
import time

import httpx
from sqlalchemy import select

from app import queue
from app.core.config import get_settings
from app.core.security import signature_header
from app.db.models import Job, Tenant
from app.db.session import session_scope
from app.schemas.jobs import WebhookPayload
from app.services.events import add_event
from app.services.jobs import to_read
from workers.celery_app import celery_app

log = logging.getLogger("alignd.webhooks")
SIGNATURE_HEADER = "alignd-signature"


class WebhookDeliveryError(Exception):
    pass


def build_request(job: Job, tenant: Tenant, event_type: str) -> tuple[bytes, dict[str, str]]:
    payload = WebhookPayload(type=event_type, data=to_read(job))
    body = json.dumps(payload.model_dump(mode="json"), separators=(",", ":")).encode()
    headers = {"content-type": "application/json", "user-agent": "alignd-webhooks/1",
               SIGNATURE_HEADER: signature_header(tenant.webhook_secret, int(time.time()), body),
               "alignd-event-type": event_type}
    return body, headers


@celery_app.task(name=queue.TASK_DELIVER_WEBHOOK, bind=True, max_retries=None)
def deliver_webhook(self, job_id: str, event_type: str) -> None:  # noqa: ANN001
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or not job.webhook_url:
            return
        tenant = session.scalar(select(Tenant).where(Tenant.id == job.tenant_id))
        body, headers = build_request(job, tenant, event_type)
        url = job.webhook_url
    headers["alignd-delivery-attempt"] = str(self.request.retries + 1)
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout_s)
        if response.status_code >= 300:
            raise WebhookDeliveryError(f"endpoint answered {response.status_code}")
    except (httpx.HTTPError, WebhookDeliveryError) as exc:
        if self.request.retries >= settings.webhook_max_retries:
            with session_scope() as session:
                add_event(session, job_id=job_id, type="webhook.failed", level="error",
                          message=f"webhook {event_type} not delivered after "
                                  f"{self.request.retries + 1} attempts: {exc}")
            return
        # Exponential backoff: 2, 4, 8, ... seconds, capped at ten minutes.
        raise self.retry(exc=exc, countdown=min(600, 2 ** (self.request.retries + 1))) from exc
    with session_scope() as session:
        add_event(session, job_id=job_id, type="webhook.delivered", message=f"webhook {event_type} delivered",
                  data={"status_code": response.status_code, "attempts": self.request.retries + 1})
