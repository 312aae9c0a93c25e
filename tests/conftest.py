"""Shared fixtures: a real Postgres database and Redis broker per test session (SQLite and the
filesystem broker where a test asks for the embedded default), API clients with keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

pytest_plugins = ["tests.fixtures.models"]

PG_ADMIN = os.environ.get("ALIGND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ALIGND_TEST_REDIS", "redis://127.0.0.1:6379")
ENV_KEYS = ("ALIGND_DATABASE_URL", "ALIGND_BROKER_URL", "ALIGND_HOME", "ALIGND_MODEL_ROOT",
            "ALIGND_ARTIFACT_ROOT", "ALIGND_STALE_AFTER_S", "ALIGND_HEARTBEAT_INTERVAL_S",
            "ALIGND_REQUEUE_INTERVAL_S", "ALIGND_MAX_JSON_BODY_BYTES", "ALIGND_MAX_UPLOAD_BYTES",
            "ALIGND_API_URL", "ALIGND_API_KEY", "ALIGND_MAX_ATTEMPTS")


def reset_caches() -> None:
    from app.core.config import reset_settings_cache
    from app.db.session import dispose_engines
    from app.queue import celery_client

    reset_settings_cache()
    from app.services.tenants import KEY_CACHE

    KEY_CACHE.clear()
    dispose_engines()
    celery_client.cache_clear()


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str | None
    home: Path

    def environ(self) -> dict[str, str]:
        env = {"ALIGND_DATABASE_URL": self.database_url, "ALIGND_HOME": str(self.home)}
        if self.broker_url:
            env["ALIGND_BROKER_URL"] = self.broker_url
        return env


def create_pg_database() -> tuple[str, str]:
    name = f"alignd_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One migrated Postgres database and one Redis db index for the session."""
    name, url = create_pg_database()
    db_index = 1 + (os.getpid() % 15)
    broker = f"{REDIS_URL}/{db_index}"
    redis.Redis.from_url(broker).flushdb()
    backend = Backend("postgres", url, broker, tmp_path_factory.mktemp("pg-home"))
    with _environment(backend.environ()):
        from app.db.migrate import upgrade

        upgrade()
    yield backend
    reset_caches()
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    home = tmp_path_factory.mktemp("embedded-home")
    backend = Backend("sqlite", f"sqlite:///{home / 'alignd.db'}", None, home)
    with _environment(backend.environ()):
        from app.db.migrate import upgrade

        upgrade()
    yield backend


class _environment:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key in ENV_KEYS:
            self.saved[key] = os.environ.pop(key, None)
        os.environ.update(self.values)
        reset_caches()

    def __exit__(self, *exc: object) -> None:
        for key in ENV_KEYS:
            os.environ.pop(key, None)
            if self.saved.get(key) is not None:
                os.environ[key] = self.saved[key]  # type: ignore[assignment]
        reset_caches()


def _truncate_all() -> None:
    from sqlalchemy import delete

    from app.db.base import Base
    from app.db.session import session_scope

    with session_scope() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(delete(table))


@pytest.fixture(params=["postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The database + broker under test; Postgres and Redis unless a test parametrizes sqlite."""
    base: Backend = request.getfixturevalue(f"{request.param}_database")
    env = base.environ() | {"ALIGND_MODEL_ROOT": str(tmp_path / "models"),
                            "ALIGND_ARTIFACT_ROOT": str(tmp_path / "artifacts")}
    (tmp_path / "models").mkdir()
    with _environment(env):
        _truncate_all()
        if base.broker_url:
            redis.Redis.from_url(base.broker_url).flushdb()
        yield base


@dataclass
class ApiClient:
    http: object  # fastapi.testclient.TestClient
    key: str
    tenant: str

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}


def make_key(tenant: str) -> str:
    from app.db.session import session_scope
    from app.services.tenants import create_api_key

    with session_scope() as session:
        return create_api_key(session, tenant_name=tenant).key


@pytest.fixture
def api(backend: Backend) -> Iterator[ApiClient]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as http:
        yield ApiClient(http=http, key=make_key("acme"), tenant="acme")


@pytest.fixture
def other_api(api: ApiClient) -> ApiClient:
    return ApiClient(http=api.http, key=make_key("globex"), tenant="globex")
