"""Engine and sessions. One engine per database URL, shared by the API and the workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import get_settings

_ENGINES: list[Engine] = []


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    engine = _make_engine(url)
    _ENGINES.append(engine)
    return engine


def dispose_engines() -> None:
    """Close every pool (tests switch databases; a forked process must not share sockets)."""
    engine_for.cache_clear()
    while _ENGINES:
        _ENGINES.pop().dispose()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001
            cursor = dbapi_connection.cursor()
            # API and worker processes write the same file: WAL plus a busy timeout.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


def get_engine() -> Engine:
    return engine_for(get_settings().resolved_database_url)


def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """For background work: commit on success, roll back on error, always close."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def async_url(url: str) -> str:
    if url.startswith("sqlite:"):
        return url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    return url


_ASYNC_ENGINES: dict[str, AsyncEngine] = {}


def get_read_engine() -> AsyncEngine:
    """For the API's hot read paths (auth, job status): async, so no thread hop or GIL convoy
    under concurrent polling, and autocommit, so a read is one round trip with no BEGIN or
    ROLLBACK. Never used for writes. Without pre-ping a connection the database dropped fails
    one request and is then discarded with the rest of the pool."""
    url = get_settings().resolved_database_url
    engine = _ASYNC_ENGINES.get(url)
    if engine is None:
        if url.startswith("sqlite"):
            engine = create_async_engine(async_url(url), connect_args={"timeout": 30})
        else:
            engine = create_async_engine(url, pool_size=20, max_overflow=20, pool_recycle=600)
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        _ASYNC_ENGINES[url] = engine
    return engine


def read_session_factory() -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(bind=get_read_engine(), expire_on_commit=False)


async def dispose_async_engines() -> None:
    while _ASYNC_ENGINES:
        _, engine = _ASYNC_ENGINES.popitem()
        await engine.dispose()
