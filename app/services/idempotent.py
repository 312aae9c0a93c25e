"""Run a create operation at most once per Idempotency-Key, atomically with its record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Tenant
from app.services import idempotency


@dataclass(frozen=True)
class CreateOutcome:
    status_code: int
    body: dict[str, Any]
    created: bool  # False when the answer is a replay of an earlier request


def create_once(session: Session, *, tenant: Tenant, endpoint: str, key: str | None, body_hash: str,
                create: Callable[[], dict[str, Any]], status_code: int = 201) -> CreateOutcome:
    """`create` adds rows to the session and returns the response body; this commits."""
    if key is not None:
        stored = idempotency.find(session, tenant_id=tenant.id, endpoint=endpoint, key=key, body_hash=body_hash)
        if stored is not None:
            return CreateOutcome(stored.status_code, stored.body, created=False)
    body = create()
    if key is not None:
        idempotency.remember(session, tenant_id=tenant.id, endpoint=endpoint, key=key, body_hash=body_hash,
                             status_code=status_code, body=body)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its result.
        session.rollback()
        if key is None:
            raise
        stored = idempotency.find(session, tenant_id=tenant.id, endpoint=endpoint, key=key, body_hash=body_hash)
        if stored is None:
            raise
        return CreateOutcome(stored.status_code, stored.body, created=False)
    return CreateOutcome(status_code, body, created=True)
