from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.support.services import RedisCluster, RedisSentinel, RedisServer, ServiceMissing
from tests.support.skipping import missing_service


def _missing_service_policy(item: pytest.Item) -> Iterator[None]:
    """A service the test or one of its fixtures needs is missing (`ServiceMissing`): skip
    locally, fail under CI."""
    try:
        return (yield)
    except ServiceMissing as exc:
        missing_service(str(exc))


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_missing_service_policy)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_missing_service_policy)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session; tests use their own databases or flush it."""
    with RedisServer() as server:
        yield server
        # Celery result handles left in reference cycles (a group's results point at each
        # other) unsubscribe from their backend when collected. Collected after the server
        # stops, at exit, each one makes Celery < 5.7 retry the dead connection 20 times, a
        # second apart: minutes before the process ends. Collect them while it is up.
        gc.collect()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server for one test, free to be killed and restarted."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    sentinel = RedisSentinel().start()
    yield sentinel
    sentinel.close()
