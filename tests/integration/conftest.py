"""Fixtures for the integration tests: real redis-server processes, real ``celery worker``
processes (prefork, two children), and a publisher in this process configured to match."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration import app as itest
from tests.support.integration import Effects, PublishLog, Stack, redis_stack, use_stack
from tests.support.services import RedisServer
from tests.support.workers import Worker


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Stack:
    """The module's stack: Redis broker, store and effects on the session server."""
    made = redis_stack(redis_server)
    use_stack(itest.app, made)
    return made


@pytest.fixture(scope="module")
def worker(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One real prefork worker (-c 2) for the whole module, consuming the module's queue."""
    running = stack.worker(tmp_path_factory.mktemp("worker")).start()
    yield running
    running.stop()


@pytest.fixture
def effects(stack: Stack) -> Iterator[Effects]:
    client = stack.effects()
    yield Effects(client)
    client.close()


@pytest.fixture
def published() -> Iterator[PublishLog]:
    with PublishLog() as log:
        yield log
