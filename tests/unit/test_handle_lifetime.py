"""The handle ``apply_async`` returns lives exactly as long as its caller keeps it, even when a
store call under the publish failed (protocol.publish, on handles kept too long).

Why it matters: a failed store call leaves a reference cycle behind (redis-py keeps the
connection error in a local of the frame that raised it), and frames in a cycle keep their
callers' frames alive until the cycle collector runs. A Celery handle held in one of those
frames is collected late, and Celery < 5.7 then unsubscribes from the task's result even when
a group waits on it: a plain ``group`` of idempotent tasks sent unprotected under
``fail_open`` never returned from ``.get()``. The cycle collector is off during each check, so
that "freed" means freed by its last reference, as Celery's group relies on."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.result import AsyncResult

from celery_idempotency import IdempotentResult, IdempotentTask
from tests.support.apps import store_down


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def sending_app(**settings: Any) -> tuple[Celery, Any]:
    app = Celery("lifetime", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(settings)

    @app.task(base=IdempotentTask, shared=False, name="tests.lifetime.charge")
    def charge(order_id: int) -> int:
        return order_id

    return app, charge


def holders(obj: Any) -> list[str]:
    return [f"{type(holder).__name__}: {str(holder)[:120]}" for holder in gc.get_referrers(obj)]


@pytest.mark.usefixtures("no_cycle_collector")
def test_a_handle_sent_unprotected_after_a_store_failure_dies_with_its_last_reference() -> None:
    app, charge = sending_app()
    store_down(app, idempotency_on_store_error="fail_open")
    for order in range(3):  # the first publish also opens the store: each one must hold
        handle = charge.apply_async((order,), idempotency_key=f"order-{order}")
        assert isinstance(handle, AsyncResult) and not isinstance(handle, IdempotentResult)
        alive = weakref.ref(handle)
        del handle
        assert alive() is None, holders(alive())
