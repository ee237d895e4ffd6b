"""`IdempotentTask.apply_many` in one process: eager mode on the memory store, and a broker
that refuses connections (a send that fails). With a real worker and Redis:
tests/integration/test_bulk.py."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_idempotency import (
    BulkPublishError,
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdempotentResult,
    IdempotentTask,
    InvalidIdempotencyKey,
    KeyState,
    MemoryKeyStore,
    RecordRef,
    StoreUnavailable,
)
from tests.support.services import free_port


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("bulk", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True,
                    idempotency_store_url="memory://")
    yield app


def make_task(app: Celery, **options: Any) -> tuple[Any, list[Any]]:
    runs: list[Any] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.receipt", **options)
    def receipt(self: Any, order_id: int, channel: str = "email") -> dict[str, Any]:
        runs.append(order_id)
        return {"order_id": order_id, "channel": channel, "task_id": self.request.id}

    return receipt, runs


def store_of(task: Any) -> MemoryKeyStore:
    store = task.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return store


def test_one_run_per_key_and_duplicates_get_the_originals_handle(app: Celery) -> None:
    receipt, runs = make_task(app)
    # 10 calls, 3 of them (30%) repeat an earlier order: derived keys, pairs and signatures.
    orders = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    calls = [((order,), {}) if n % 2 else receipt.s(order) for n, order in enumerate(orders)]

    handles = receipt.apply_many(calls)

    assert sorted(runs) == [1, 2, 3, 4, 5, 6, 7]
    assert all(isinstance(h, IdempotentResult) for h in handles)
    assert [h.duplicate for h in handles] == [False] * 7 + [True] * 3
    for original, duplicate in zip(handles[:3], handles[7:], strict=True):
        assert duplicate.id == original.id
        assert duplicate.get() == original.get()
    assert len({h.id for h in handles}) == 7


def test_keys_and_options_per_call_from_signatures(app: Celery) -> None:
    receipt, runs = make_task(app)
    handles = receipt.apply_many([
        receipt.s(1).set(idempotency_key="order-1"),
        receipt.s(1, channel="sms").set(idempotency_key="order-1-sms"),
        receipt.s(1).set(idempotency_key="order-1"),
    ])
    assert runs == [1, 1]
    assert [h.idempotency_key for h in handles] == ["order-1", "order-1-sms", "order-1"]
    assert handles[2].duplicate and handles[2].id == handles[0].id
    assert handles[1].get()["channel"] == "sms"


def test_a_call_that_cannot_be_published_raises_before_anything_is_sent(app: Celery) -> None:
    receipt, runs = make_task(app)
    with pytest.raises(InvalidIdempotencyKey) as info:
        receipt.apply_many([receipt.s(1), receipt.s(2).set(idempotency_key=""), receipt.s(3)])
    assert runs == []
    assert list(store_of(receipt).scan()) == []
    notes = getattr(info.value, "__notes__", None)
    if notes is not None:  # Python >= 3.11: the note names the call
        assert "call 1 of tests.receipt.apply_many" in notes[0]


@pytest.mark.parametrize("call", [42, ((1,),), ("not args", {}), {"args": (1,)}])
def test_what_is_not_a_call_is_refused_naming_it(app: Celery, call: Any) -> None:
    receipt, runs = make_task(app)
    with pytest.raises(TypeError, match=r"apply_many takes signatures of tests\.receipt"):
        receipt.apply_many([receipt.s(1), call])
    assert runs == []


def test_a_signature_of_another_task_is_refused(app: Celery) -> None:
    receipt, runs = make_task(app)

    @app.task(shared=False, name="tests.other")
    def other(order_id: int) -> None:
        pass

    with pytest.raises(TypeError, match="signatures of that task only"):
        receipt.apply_many([receipt.s(1), other.s(2)])
    assert runs == []


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "10"])
def test_batch_size_must_be_a_positive_integer(app: Celery, size: Any) -> None:
    receipt, _ = make_task(app)
    with pytest.raises(ConfigurationError, match="batch_size"):
        receipt.apply_many([receipt.s(1)], batch_size=size)


def test_a_key_reused_with_other_arguments_is_that_calls_error(app: Celery) -> None:
    receipt, runs = make_task(app)
    receipt.apply_async((1,), idempotency_key="k1")
    calls = [receipt.s(2), receipt.s(3).set(idempotency_key="k1"), receipt.s(4)]

    with pytest.raises(BulkPublishError) as info:
        receipt.apply_many(calls)

    assert runs == [1, 2, 4]  # the other calls were published
    error = info.value
    assert list(error.errors) == [1] and isinstance(error.errors[1], IdempotencyKeyMismatch)
    assert isinstance(error.__cause__, IdempotencyKeyMismatch)
    assert error.results[0].get()["order_id"] == 2 and error.results[2].get()["order_id"] == 4

    results = receipt.apply_many(calls, return_exceptions=True)
    assert isinstance(results[1], IdempotencyKeyMismatch)
    assert results[0].duplicate and results[2].duplicate
    assert runs == [1, 2, 4]


def test_batches_of_batch_size_find_duplicates_across_batches(app: Celery) -> None:
    receipt, runs = make_task(app)
    handles = receipt.apply_many([receipt.s(n % 5) for n in range(12)], batch_size=3)
    assert sorted(runs) == [0, 1, 2, 3, 4]
    assert [h.duplicate for h in handles] == [False] * 5 + [True] * 7
    assert [h.id for h in handles[5:]] == [handles[n % 5].id for n in range(5, 12)]


def test_no_calls_no_handles(app: Celery) -> None:
    receipt, runs = make_task(app)
    assert receipt.apply_many([]) == []
    assert runs == []
    assert receipt.apply_many(iter([])) == []


def test_unreachable_store_sends_nothing_or_everything_unprotected(app: Celery) -> None:
    app.conf.idempotency_store_url = f"redis://127.0.0.1:{free_port()}/0"
    app.conf.idempotency_store_timeout = 0.3
    receipt, runs = make_task(app)
    with pytest.raises(StoreUnavailable):
        receipt.apply_many([receipt.s(1), receipt.s(1)])
    assert runs == []

    receipt.reset_idem_config()
    app.conf.idempotency_on_store_error = "fail_open"
    results = receipt.apply_many([receipt.s(1), receipt.s(1)])
    assert runs == [1, 1]  # unprotected: as apply_async with fail_open
    assert not any(isinstance(r, IdempotentResult) for r in results)


@pytest.mark.parametrize("batch_size", [1000, 1])
def test_a_failed_send_gives_back_the_reservations_of_what_was_not_sent(batch_size: int) -> None:
    """A broker that refuses connections: the first send fails, the batch stops (the later
    batches are not reserved or sent either), every call answers with that error and no
    reservation is left behind (compare-and-delete)."""
    app = Celery("bulk-send", broker=f"redis://127.0.0.1:{free_port()}/0",
                 set_as_current=False)
    app.conf.update(idempotency_store_url="memory://", broker_connection_timeout=0.3,
                    broker_connection_retry=False)
    receipt, _ = make_task(app)
    store = store_of(receipt)
    store.reserve(RecordRef("tests.receipt", "existing"), task_id="earlier",
                  fingerprint="fp", task_name="tests.receipt", ttl_ms=60_000)

    with pytest.raises(BulkPublishError) as info:
        receipt.apply_many([receipt.s(1), receipt.s(2), receipt.s(1)], retry=False,
                           batch_size=batch_size)

    error = info.value
    assert sorted(error.errors) == [0, 1, 2]
    assert error.errors[0] is error.errors[1] is error.errors[2]
    assert not isinstance(error.errors[0], BulkPublishError)
    remaining = [record.key for record in store.scan()]
    assert remaining == ["existing"], "only the record the batch did not make is left"
    record = store.get(RecordRef("tests.receipt", "existing"))
    assert record is not None and record.state is KeyState.PENDING


def test_a_task_with_idempotency_disabled_sends_every_call(app: Celery) -> None:
    receipt, runs = make_task(app, idempotency_enabled=False)
    results = receipt.apply_many([receipt.s(1), receipt.s(1)])
    assert runs == [1, 1]
    assert not any(isinstance(r, IdempotentResult) for r in results)
    assert list(store_of(receipt).scan()) == []


def test_bulk_publish_error_pickles_with_its_errors() -> None:
    mismatch = IdempotencyKeyMismatch("reused", key="k1", task_id="t0")
    error = BulkPublishError("1 of 2 call(s)", [object(), mismatch])
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, BulkPublishError) and str(copy) == "1 of 2 call(s)"
    assert copy.results[0] is None and list(copy.errors) == [1]
    assert isinstance(copy.errors[1], IdempotencyKeyMismatch)
    assert (copy.errors[1].key, copy.errors[1].task_id) == ("k1", "t0")
