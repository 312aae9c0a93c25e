from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.stack import Client, Stack, isolated_stack


@pytest.fixture(scope="session")
def stack(tiny_models, tmp_path_factory) -> Iterator[Stack]:
    # Short timings so a killed worker's job is noticed and requeued within seconds.
    with isolated_stack(tiny_models.root, tmp_path_factory.mktemp("stack"), redis_offset=7,
                        ALIGND_HEARTBEAT_INTERVAL_S="1", ALIGND_STALE_AFTER_S="6",
                        ALIGND_REQUEUE_INTERVAL_S="2") as s:
        s.start_api()
        s.start_gpu_worker()
        s.start_default_worker()
        yield s


@pytest.fixture(scope="session")
def client(stack: Stack) -> Client:
    return Client(stack, stack.key("e2e"))
