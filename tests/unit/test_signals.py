from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from celery_idempotency import IdempotentTask, InvalidIdempotencyKey
from celery_idempotency import signals as idem_signals
from celery_idempotency.signals import idempotency_key, install
from tests.support.apps import eager_app


@pytest.fixture
def app() -> Celery:
    return eager_app("sig")  # a retry's exception stays in its EagerResult


def test_context_key_is_used_by_apply_async_and_delay(app: Celery) -> None:
    calls: list[int] = []

    @app.task(shared=False, base=IdempotentTask)
    def job(n: int) -> int:
        calls.append(n)
        return n

    with idempotency_key("req-1"):
        first = job.delay(5)
        second = job.delay(5)
    assert first.idempotency_key == "req-1" and second.duplicate and calls == [5]
    # An explicit key wins over the context.
    with idempotency_key("req-1"):
        assert job.apply_async((6,), idempotency_key="req-2").idempotency_key == "req-2"


def test_context_validates_the_key_at_once() -> None:
    with pytest.raises(InvalidIdempotencyKey), idempotency_key(""):
        pass


def test_install_stamps_the_context_key_on_messages_published_by_name() -> None:
    install()
    install()  # idempotent
    headers: dict[str, Any] = {}
    with idempotency_key("by-name"):
        idem_signals.before_task_publish.send(sender="some.task", headers=headers, body=None)
    assert headers["idempotency_key"] == "by-name"
    kept = {"idempotency_key": "own"}
    with idempotency_key("by-name"):
        idem_signals.before_task_publish.send(sender="some.task", headers=kept, body=None)
    assert kept["idempotency_key"] == "own"
    untouched: dict[str, Any] = {}
    idem_signals.before_task_publish.send(sender="some.task", headers=untouched, body=None)
    assert untouched == {}


def test_library_signals_are_sent_with_key_scope_and_task_id(app: Celery) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def recorder(name: str) -> Any:
        def receive(sender: Any = None, **kwargs: Any) -> None:
            seen.append((name, kwargs))
        return receive

    receivers = {name: recorder(name) for name in
                 ("key_claimed", "duplicate_published", "outcome_replayed", "claim_released")}
    for name, receiver in receivers.items():
        getattr(idem_signals, name).connect(receiver, weak=False)
    try:
        @app.task(shared=False, base=IdempotentTask, bind=True, max_retries=1)
        def job(self: Any, n: int) -> int:
            if self.request.retries == 0:
                raise self.retry(countdown=0)
            return n

        app.conf.task_eager_propagates = False
        first = job.apply_async((1,), idempotency_key="s-1")
        job.apply_async((1,), idempotency_key="s-1")
        job.apply((1,), headers={"idempotency_key": "s-1"})  # a duplicate message that runs
    finally:
        for name, receiver in receivers.items():
            getattr(idem_signals, name).disconnect(receiver)
    names = [name for name, _ in seen]
    assert names == ["key_claimed", "claim_released", "key_claimed", "duplicate_published",
                     "outcome_replayed"]
    assert all(kwargs["key"] == "s-1" and kwargs["scope"] == job.name for _, kwargs in seen)
    assert seen[0][1]["task_id"] == first.id
    assert seen[2][1]["fence"] > seen[0][1]["fence"]  # the retry's claim fences above
    assert seen[1][1]["reason"] == "retry"
    assert seen[3][1]["original_task_id"] == first.id
    assert seen[4][1]["state"] == "succeeded"
