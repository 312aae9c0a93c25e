"""The job-status read, the API's hottest path (clients poll it), at one prepared round trip.

On Postgres it runs on a psycopg async pool with a prepared statement (the SQL is compiled from
the SQLAlchemy table, so the schema has one definition); SQLAlchemy's async Core costs about a
millisecond more per call, which is most of a status request. Elsewhere (SQLite) it falls back
to SQLAlchemy's async engine. Reads only: autocommit, no transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql

from app.core.config import get_settings
from app.db.models import Job
from app.db.session import get_read_engine

_JOB_BY_TENANT = select(Job.__table__).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


def _psycopg_sql() -> str:
    compiled = _JOB_BY_TENANT.compile(dialect=postgresql.dialect(paramstyle="pyformat"))
    return str(compiled)


class JobReader:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.is_postgres = database_url.startswith("postgresql")
        self._pool = None
        self._lock = asyncio.Lock()
        self._sql = _psycopg_sql() if self.is_postgres else None

    async def _postgres_pool(self):  # noqa: ANN202 — psycopg_pool.AsyncConnectionPool
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    from psycopg.rows import dict_row
                    from psycopg_pool import AsyncConnectionPool

                    conninfo = self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
                    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=20, open=False,
                                               kwargs={"autocommit": True, "row_factory": dict_row})
                    await pool.open()
                    self._pool = pool
        return self._pool

    async def job_row(self, *, job_id: str, tenant_id: str) -> Mapping[str, Any] | None:
        params = {"job_id": job_id, "tenant_id": tenant_id}
        if self.is_postgres:
            pool = await self._postgres_pool()
            async with pool.connection() as connection:
                cursor = await connection.execute(self._sql, params, prepare=True)
                return await cursor.fetchone()
        async with get_read_engine().connect() as connection:
            return (await connection.execute(_JOB_BY_TENANT, params)).mappings().first()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


# A pool belongs to the event loop that opened it (one per API process; tests start several).
_READERS: dict[tuple[str, int], JobReader] = {}


def job_reader() -> JobReader:
    key = (get_settings().resolved_database_url, id(asyncio.get_running_loop()))
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = JobReader(key[0])
    return reader


async def close_readers() -> None:
    loop = id(asyncio.get_running_loop())
    for key in [k for k in _READERS if k[1] == loop]:
        await _READERS.pop(key).close()
