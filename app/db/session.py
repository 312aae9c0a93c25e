"""Engine and sessions. One engine per database URL, shared by the API and the workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
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
