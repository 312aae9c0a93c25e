"""Server-sent events for a job's log, until the job ends."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from sqlalchemy import select

from app.db.models import Job
from app.db.session import session_scope
from app.schemas.jobs import TERMINAL_STATUSES, JobEventRead
from app.services.events import list_events

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0


def stream_events(job_id: str, *, after: int | None) -> Iterator[str]:
    last_id = after
    last_sent = time.monotonic()
    while True:
        with session_scope() as session:
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            events, _ = list_events(session, job_id=job_id, after=last_id, limit=500)
            payloads = [JobEventRead.model_validate(e, from_attributes=True) for e in events]
        for event in payloads:
            last_id = event.id
            last_sent = time.monotonic()
            yield f"id: {event.id}\nevent: job.event\ndata: {event.model_dump_json()}\n\n"
        if status is None or (status in TERMINAL_STATUSES and not payloads):
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"
        time.sleep(POLL_SECONDS)
