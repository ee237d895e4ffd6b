"""`IdempotentGroup` in one process: an in-memory broker (messages published, no worker) and
the memory store, next to a plain ``celery.group`` of the same members. With a real worker and
Redis: tests/integration/test_group_batch.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, group
from celery.signals import after_task_publish

from celery_idempotency import (
    IdempotencyKeyMismatch,
    IdempotentGroup,
    IdempotentTask,
    KeyState,
    MemoryKeyStore,
    RecordRef,
)
from tests.support.services import free_port

KINDS = pytest.mark.parametrize("kind", [group, IdempotentGroup],
                                ids=["group", "IdempotentGroup"])


def make_app(broker: str = "memory://", **settings: Any) -> tuple[Celery, Any, MemoryKeyStore]:
    app = Celery("groups", broker=broker, set_as_current=False)
    app.conf.update(idempotency_store_url="memory://", **settings)

    @app.task(shared=False, base=IdempotentTask, name="tests.receipt")
    def receipt(order_id: int, amount: int = 1) -> int:
        return order_id

    store = receipt.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return app, receipt, store


@pytest.fixture
def sent() -> Iterator[list[str]]:
    """The keys of the messages published during the test, in order."""
    keys: list[str] = []

    def on_publish(headers: Any = None, **_: Any) -> None:
        keys.append((headers or {}).get("idempotency_key"))

    after_task_publish.connect(on_publish, weak=False)
    yield keys
    after_task_publish.disconnect(on_publish)


class Calls:
    """Counts a store's reserve_many calls, and its reserve calls made outside of them (the
    memory store's reserve_many calls reserve under its lock)."""

    def __init__(self, store: MemoryKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reserve = self.reserve_many = 0
        self._inside = False
        reserve, reserve_many = store.reserve, store.reserve_many

        def counted_reserve(*args: Any, **kwargs: Any) -> Any:
            self.reserve += not self._inside
            return reserve(*args, **kwargs)

        def counted_reserve_many(*args: Any, **kwargs: Any) -> Any:
            self.reserve_many += 1
            self._inside = True
            try:
                return reserve_many(*args, **kwargs)
            finally:
                self._inside = False

        monkeypatch.setattr(store, "reserve", counted_reserve)
        monkeypatch.setattr(store, "reserve_many", counted_reserve_many)


@pytest.mark.parametrize(("kind", "reserve_many", "reserve"),
                         [(group, 0, 10), (IdempotentGroup, 1, 0)],
                         ids=["group", "IdempotentGroup"])
def test_one_reserve_many_for_the_group(kind: Any, reserve_many: int, reserve: int,
                                        monkeypatch: pytest.MonkeyPatch,
                                        sent: list[str]) -> None:
    _, receipt, store = make_app()
    calls = Calls(store, monkeypatch)
    members = [receipt.s(n % 7).set(idempotency_key=f"k{n % 7}") for n in range(10)]

    result = kind(members)()

    assert (calls.reserve_many, calls.reserve) == (reserve_many, reserve)
    assert sent == [f"k{n % 7}" for n in range(10)], "every member is sent, in order"
    assert len(result.results) == 10
    # A repeated key is reserved by its first member, as member-by-member.
    record = store.get(RecordRef("tests.receipt", "k0"))
    assert record is not None and record.task_id == result.results[0].id


@KINDS
def test_a_mismatch_stops_the_group_at_that_member(kind: Any, sent: list[str]) -> None:
    _, receipt, store = make_app()
    receipt.apply_async((1,), idempotency_key="taken")
    sent.clear()
    members = [receipt.s(2).set(idempotency_key="before"),
               receipt.s(1, amount=5).set(idempotency_key="taken"),
               receipt.s(3).set(idempotency_key="after")]

    with pytest.raises(IdempotencyKeyMismatch):
        kind(members)()

    assert sent == ["before"]
    # The member after it is not sent, and holds no reservation (given back, if made ahead).
    assert store.get(RecordRef("tests.receipt", "after")) is None
    before = store.get(RecordRef("tests.receipt", "before"))
    assert before is not None and before.state is KeyState.PENDING


@KINDS
def test_a_failed_send_gives_back_what_was_not_sent(kind: Any, sent: list[str]) -> None:
    _, receipt, store = make_app(f"redis://127.0.0.1:{free_port()}/0",
                                 broker_connection_timeout=0.3, broker_connection_retry=False,
                                 task_publish_retry=False)
    with pytest.raises(Exception) as info:
        kind(receipt.s(1).set(idempotency_key="a"), receipt.s(2).set(idempotency_key="b"))()
    assert not isinstance(info.value, AssertionError)
    assert sent == []
    assert list(store.scan()) == [], "no reservation is left behind"


@KINDS
def test_eager_groups_are_celerys(kind: Any) -> None:
    _, receipt, _ = make_app(task_always_eager=True)
    assert kind(receipt.s(1), receipt.s(2), receipt.s(1))().get() == [1, 2, 1]
