from __future__ import annotations

import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.db.base import Base
from app.db.session import get_engine


def test_models_and_migrations_agree_on_postgres(backend):
    assert backend.name == "postgres"
    with get_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        assert compare_metadata(context, Base.metadata) == []


def test_sqlite_schema_made_by_migrations(sqlite_database):
    from sqlalchemy import create_engine

    engine = create_engine(sqlite_database.database_url)
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)


def test_alignd_db_upgrade_command(tmp_path):
    env = {"ALIGND_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "alignd.cli", "db", "upgrade"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from sqlalchemy import create_engine

    tables = inspect(create_engine(f"sqlite:///{tmp_path / 'alignd.db'}")).get_table_names()
    assert "jobs" in tables and "alembic_version" in tables
