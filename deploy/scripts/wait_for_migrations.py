"""Wait until the database schema is at the Alembic head, then exit 0 (exit 1 on timeout).

Kubernetes has no "start after that Job completed": the API and worker pods run this as an init
container, so they start only once the `alignd-migrate` Job has run `alignd db upgrade` (compose
says the same with `depends_on: condition: service_completed_successfully`). It only reads the
`alembic_version` table; the Job stays the one place that changes the schema.

    python deploy/scripts/wait_for_migrations.py [--timeout SECONDS] [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time

from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from app.core.config import get_settings
from app.db.migrate import alembic_config


def expected_heads() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_heads(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return set(MigrationContext.configure(connection).get_current_heads())
    finally:
        engine.dispose()


def wait_for_head(url: str, *, timeout_s: float, interval_s: float) -> bool:
    wanted = expected_heads()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            current = current_heads(url)
            state = f"at {sorted(current) or 'no revision'}, want {sorted(wanted)}"
        except SQLAlchemyError as exc:  # database not up yet: keep waiting, say why
            current, state = set(), f"database unreachable ({type(exc).__name__})"
        if current == wanted:
            print(f"schema at head {sorted(wanted)}", flush=True)
            return True
        if time.monotonic() >= deadline:
            print(f"gave up waiting for migrations: {state}", file=sys.stderr, flush=True)
            return False
        print(f"waiting for migrations: {state}", flush=True)
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between checks")
    args = parser.parse_args(argv)
    url = get_settings().resolved_database_url
    return 0 if wait_for_head(url, timeout_s=args.timeout, interval_s=args.interval) else 1


if __name__ == "__main__":
    sys.exit(main())
