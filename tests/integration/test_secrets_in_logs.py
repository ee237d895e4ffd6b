"""A real worker whose store URL is wrong logs why, and never the password in it: a malformed
URL (the task fails with a usage error) and an unreachable store (the task waits)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration import app as itest
from tests.integration.app import charge
from tests.support.apps import forget_idempotency_settings
from tests.support.integration import (
    Stack,
    new_order_id,
    redis_stack,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer, free_port

SECRET = "Wk3r/p@ss:word"
FORMS = (SECRET, quote(SECRET, safe=""), "Wk3r", "ss:word")


def publish_with_memory_store(stack: Stack) -> None:
    """Point the publisher at the stack's broker, but let it keep its keys in memory: only the
    worker uses the broken store URL."""
    use_stack(itest.app, stack)
    itest.app.conf.idempotency_store_url = "memory://"
    forget_idempotency_settings(itest.app)
    charge.apply_async((new_order_id(),), idempotency_key=unique("k"))


@pytest.mark.parametrize(("url", "logged"), [
    ("redis://app:{pw}@127.0.0.1:99999/0", "bad port '99999'"),
    ("redis+sentinel://app:{pw}@127.0.0.1:26379/svc/0/extra", "service_name"),
    ("redis://app:{pw}@127.0.0.1:{port}/0", "store unreachable"),
])
def test_a_worker_never_logs_the_store_password(redis_server: RedisServer, tmp_path: Path,
                                                url: str, logged: str) -> None:
    store_url = url.format(pw=quote(SECRET, safe=""), port=free_port())
    base = redis_stack(redis_server, idempotency_store_timeout=0.3,
                       idempotency_store_retry_max_delay=0.5)
    stack = Stack(base.broker_url, store_url, base.effects_url, base.queue, base.extra_conf)
    worker = stack.worker(tmp_path).start()
    try:
        publish_with_memory_store(stack)
        wait_for(lambda: logged in worker.output(), what=f"the worker to log {logged!r}",
                 worker=worker)
    finally:
        worker.stop()
    output = worker.output()
    assert not [form for form in FORMS if form in output], output[-3000:]
