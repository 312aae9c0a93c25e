"""Idempotency-Key (Stripe semantics): same key + same body replays, another body is an error.

The record is written in the same transaction as the resource it describes, so a crash can
never leave a job without its key or a key without its job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import UnprocessableRequest
from app.db.base import utcnow
from app.db.models import IdempotencyRecord

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def request_hash(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise UnprocessableRequest(f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters",
                                   param="Idempotency-Key", code="invalid_idempotency_key")
    return key


def find(session: Session, *, tenant_id: str, endpoint: str, key: str, body_hash: str) -> StoredResponse | None:
    record = session.scalar(select(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id,
        IdempotencyRecord.endpoint == endpoint,
        IdempotencyRecord.key == key,
        IdempotencyRecord.expires_at > utcnow(),
    ))
    if record is None:
        return None
    if record.request_hash != body_hash:
        raise UnprocessableRequest("this Idempotency-Key was used with a different request body",
                                   param="Idempotency-Key", code="idempotency_key_reused")
    return StoredResponse(record.status_code, record.response_body)


def remember(session: Session, *, tenant_id: str, endpoint: str, key: str, body_hash: str,
             status_code: int, body: dict[str, Any]) -> None:
    # An expired record with the same key is replaced rather than colliding on the unique index.
    session.execute(delete(IdempotencyRecord).where(
        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.endpoint == endpoint,
        IdempotencyRecord.key == key, IdempotencyRecord.expires_at <= utcnow()))
    ttl = timedelta(hours=get_settings().idempotency_ttl_hours)
    session.add(IdempotencyRecord(tenant_id=tenant_id, endpoint=endpoint, key=key, request_hash=body_hash,
                                  status_code=status_code, response_body=body, expires_at=utcnow() + ttl))


def purge_expired(session: Session) -> int:
    result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at <= utcnow()))
    return result.rowcount or 0
