"""Tenants and their API keys."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
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


class _KeyCache:
    """Recently seen key hashes -> tenant, so polling clients don't cost a query per request.
    A revoked key keeps working for at most `ttl` seconds in each API process."""

    def __init__(self, ttl: float = 30.0, size: int = 4096) -> None:
        self.ttl, self.size = ttl, size
        self._entries: dict[str, tuple[float, Tenant]] = {}

    def get(self, key_hash: str) -> Tenant | None:
        entry = self._entries.get(key_hash)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key_hash: str, tenant: Tenant) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + self.ttl, tenant)

    def clear(self) -> None:
        self._entries.clear()


KEY_CACHE = _KeyCache()


def _bearer_key_hash(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationFailed("missing API key: send 'Authorization: Bearer <key>'",
                                   code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("authorization must be 'Bearer <key>'", headers={"WWW-Authenticate": "Bearer"})
    return hash_api_key(token)


def _active_key(key_hash: str):  # noqa: ANN202 — a select() statement
    return select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))


def _accept(record: ApiKey | None, key_hash: str) -> Tenant:
    if record is None:
        raise AuthenticationFailed("invalid API key", headers={"WWW-Authenticate": "Bearer"})
    KEY_CACHE.put(key_hash, record.tenant)
    return record.tenant


def cached_tenant(authorization: str | None) -> Tenant | None:
    """The tenant of a recently seen, well-formed key; None means: ask the database."""
    try:
        return KEY_CACHE.get(_bearer_key_hash(authorization))
    except AuthenticationFailed:
        return None


async def authenticate_async(sessions: async_sessionmaker[AsyncSession], *, authorization: str | None) -> Tenant:
    key_hash = _bearer_key_hash(authorization)
    cached = KEY_CACHE.get(key_hash)
    if cached is not None:
        return cached
    async with sessions() as session:
        return _accept(await session.scalar(_active_key(key_hash)), key_hash)
