"""Tenants and their API keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import AuthenticationFailed
from app.core.security import hash_api_key, new_api_key, new_id, new_webhook_secret
from app.db.models import ApiKey, Tenant


@dataclass(frozen=True)
class IssuedKey:
    tenant: Tenant
    key: str


TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    if not TENANT_NAME.match(name):
        raise ValueError("tenant names are 1-63 letters, digits, '_' or '-', starting with a letter or digit")
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=name, webhook_secret=new_webhook_secret())
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, *, tenant_name: str) -> IssuedKey:
    tenant = get_or_create_tenant(session, name=tenant_name)
    key = new_api_key()
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_api_key(key), prefix=key[:10]))
    session.flush()
    return IssuedKey(tenant=tenant, key=key)


def authenticate(session: Session, *, authorization: str | None) -> Tenant:
    if not authorization:
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'",
                                   code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("authorization must be 'Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    record = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(token), ApiKey.revoked_at.is_(None))
    )
    if record is None:
        raise AuthenticationFailed("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return record.tenant
