"""Fixtures for the integration tests: real redis-server processes, real ``celery worker``
processes (prefork, two children), and a publisher in this process configured to match.

One name per thing: ``stack`` and ``worker`` are the module's (Redis broker, store and effects
on the session server; one prefork worker); ``outage_stack`` puts the key store on a
redis-server of the test's own (``own_redis``) that the test stops, restarts or makes answer
errors; ``own_stack`` is a queue of the test's own for the workers it starts with ``fleet``;
``effects`` is the effects db (the same for every stack on the session server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.integration import app as itest
from tests.support.integration import (
    EFFECTS_DB,
    Effects,
    Fleet,
    PublishLog,
    Stack,
    redis_stack,
    use_stack,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

# The publisher's settings a test's stack may change (``extra_conf``), put back by `app_conf`.
_RESTORED = ("broker_transport_options", "idempotency_store_retry_max_delay",
             "idempotency_store_timeout")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def tested_app() -> tuple[Celery, str]:
    """The app the module's publisher and worker run, and its module (``celery -A``); a test
    module of another app overrides this."""
    return itest.app, itest.__name__


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tested_app: tuple[Celery, str]) -> Stack:
    """The module's stack: Redis broker, store and effects on the session server."""
    made = redis_stack(redis_server)
    use_stack(tested_app[0], made)
    return made


@pytest.fixture(scope="module")
def worker(stack: Stack, tested_app: tuple[Celery, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One real prefork worker (-c 2) for the whole module, consuming the module's queue."""
    running = stack.worker(tmp_path_factory.mktemp("worker"), app=tested_app[1]).start()
    yield running
    running.stop()


@pytest.fixture
def effects(redis_server: RedisServer) -> Iterator[Effects]:
    """The effects db: every stack on the session server records its side effects there."""
    client = redis_server.client(EFFECTS_DB)
    yield Effects(client)
    client.close()


@pytest.fixture
def published() -> Iterator[PublishLog]:
    with PublishLog() as log:
        yield log


@pytest.fixture
def app_conf() -> Iterator[None]:
    """Put back the publisher's settings that a test's stack changed (``extra_conf``)."""
    saved = {name: itest.app.conf.get(name) for name in _RESTORED}
    yield
    itest.app.conf.update(saved)


@pytest.fixture
def module_stack(stack: Stack, app_conf: None) -> Stack:
    """The module's stack (and worker's queue), the publisher pointed at it again: for tests
    that kill, revoke or outlast a child of the module's worker, after a test that pointed the
    publisher elsewhere."""
    use_stack(itest.app, stack)
    return stack


@pytest.fixture
def own_stack(redis_server: RedisServer, app_conf: None) -> Stack:
    """A stack (queue) of the test's own, for workers the test starts itself."""
    made = redis_stack(redis_server)
    use_stack(itest.app, made)
    return made


@pytest.fixture
def outage_stack(redis_server: RedisServer, own_redis: RedisServer, app_conf: None) -> Stack:
    """The key store on the test's own redis-server (``own_redis``), to be stopped, restarted
    or made to answer errors; broker and effects stay on the session server. A short store
    timeout and backoff cap, so that a worker looks again soon after the store is back."""
    made = redis_stack(redis_server, store=own_redis, idempotency_store_timeout=0.5,
                       idempotency_store_retry_max_delay=1.0)
    use_stack(itest.app, made)
    return made


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The workers a test starts itself (and the processes it freezes), all stopped after it."""
    made = Fleet(tmp_path)
    yield made
    made.close()
