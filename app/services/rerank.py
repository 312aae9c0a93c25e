"""Best-of-N: rank N sampled answers with the job's reward model, on a worker, and wait for it.

The API never loads a reward model. It stores the candidates as a `rerank_requests` row, commits,
sends `alignd.rerank` (rerank queue) with the row's id, and polls the row until the task has
written the scores. Celery runs without a result backend; a row works the same on every
deployment alignd has (SQLite + filesystem broker, Postgres + Redis), keeps large candidate lists
out of the broker, and the task stays an idempotent function of an id. Polling starts at 20 ms and
backs off to 200 ms: small beside a reward-model forward pass.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

from fastapi.concurrency import run_in_threadpool
from sqlalchemy import delete, select

from app import queue
from app.core.config import get_settings
from app.core.errors import AlignError
from app.core.security import new_id
from app.db.base import utcnow
from app.db.models import RerankRequest
from app.db.session import read_session_factory, session_scope


class RerankFailed(AlignError):
    status_code = 502
    type = "server_error"
    code = "rerank_failed"


class RerankTimeout(AlignError):
    status_code = 504
    type = "server_error"
    code = "rerank_timeout"


def _submit(*, tenant_id: str, job_id: str, prompt: Any, candidates: list[str]) -> str:
    request_id = new_id("rr")
    with session_scope() as session:
        session.add(RerankRequest(id=request_id, tenant_id=tenant_id, job_id=job_id, prompt=prompt,
                                  candidates=candidates, status="pending"))
    queue.send(queue.TASK_RERANK, [request_id])  # after the commit: the worker must find the row
    return request_id


async def _wait(request_id: str, timeout: float) -> list[float]:
    sessions = read_session_factory()
    deadline = time.monotonic() + timeout
    interval = 0.02
    query = select(RerankRequest.status, RerankRequest.scores, RerankRequest.error_message).where(
        RerankRequest.id == request_id)
    while True:
        async with sessions() as session:
            row = (await session.execute(query)).first()
        if row is not None and row.status == "succeeded":
            return [float(s) for s in row.scores]
        if row is not None and row.status == "failed":
            raise RerankFailed(f"reranking failed: {row.error_message}")
        if time.monotonic() >= deadline:
            raise RerankTimeout(f"no rerank worker answered within {timeout:.0f}s (is a worker consuming the "
                                f"'{queue.RERANK_QUEUE}' queue running?)")
        await asyncio.sleep(interval)
        interval = min(0.2, interval * 1.5)


async def rerank(*, tenant_id: str, job_id: str, prompt: Any, candidates: list[str]) -> list[float]:
    """The reward model's score of each candidate for `prompt` (chat messages or raw text)."""
    request_id = await run_in_threadpool(_submit, tenant_id=tenant_id, job_id=job_id, prompt=prompt,
                                         candidates=candidates)
    return await _wait(request_id, get_settings().rerank_timeout_s)


def ranked(scores: list[float], n: int) -> list[int]:
    """Indices of the n best candidates, best first; ties keep sampling order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]


def purge_finished(*, older_than_s: float = 3600.0) -> int:
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with session_scope() as session:
        return session.execute(delete(RerankRequest).where(RerankRequest.created_at < cutoff)).rowcount or 0
