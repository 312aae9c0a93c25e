from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from tests.conftest import REDIS_URL, create_pg_database, drop_pg_database
from tests.e2e.stack import Client, Stack


@pytest.fixture(scope="session")
def stack(tiny_models, tmp_path_factory) -> Iterator[Stack]:
    """Its own database and Redis index, so the API tests' per-test truncation never touches it."""
    home = tmp_path_factory.mktemp("stack")
    db_name, database_url = create_pg_database()
    broker_url = f"{REDIS_URL}/{1 + (os.getpid() + 7) % 15}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ALIGND_")},
        "ALIGND_DATABASE_URL": database_url,
        "ALIGND_BROKER_URL": broker_url,
        "ALIGND_HOME": str(home),
        "ALIGND_MODEL_ROOT": str(tiny_models.root),
        "ALIGND_ARTIFACT_ROOT": str(home / "artifacts"),
        # Short timings so a killed worker's job is noticed and requeued within seconds.
        "ALIGND_HEARTBEAT_INTERVAL_S": "1",
        "ALIGND_STALE_AFTER_S": "6",
        "ALIGND_REQUEUE_INTERVAL_S": "2",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    redis.Redis.from_url(broker_url).flushdb()
    s = Stack(env=env, logs=home)
    s.migrate()
    s.start_api()
    s.start_gpu_worker()
    s.start_default_worker()
    yield s
    s.stop()
    drop_pg_database(db_name)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Client:
    return Client(stack, stack.key("e2e"))
