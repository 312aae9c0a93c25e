"""Typed dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.db.models import Tenant
from app.db.session import session_factory
from app.services.idempotency import check_key
from app.services.tenants import authenticate


def get_db() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


def current_tenant(session: SessionDep, authorization: Annotated[str | None, Header()] = None) -> Tenant:
    return authenticate(session, authorization=authorization)


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def idempotency_key(idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> str | None:
    return check_key(idempotency_key) if idempotency_key is not None else None


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
