"""Typed dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from app.db.models import Tenant
from app.db.session import read_session_factory, session_factory
from app.services.idempotency import check_key
from app.services.tenants import authenticate_async, cached_tenant


def get_db() -> Iterator[Session]:
    session = session_factory()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]


async def current_tenant(authorization: Annotated[str | None, Header()] = None) -> Tenant:
    # Async, and most requests are answered from the key cache without a session at all.
    return cached_tenant(authorization) or await authenticate_async(read_session_factory(),
                                                                    authorization=authorization)


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def idempotency_key(idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> str | None:
    return check_key(idempotency_key) if idempotency_key is not None else None


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
