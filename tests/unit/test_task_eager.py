"""IdempotentTask in eager mode (task_always_eager / .apply()) on the memory store: the same
state machine as with a worker, in one process."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from celery import Celery

from celery_idempotency import (
    ArgumentsNotCanonical,
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdempotencyKeyRequired,
    IdempotentTask,
    InvalidIdempotencyKey,
    KeyState,
    MemoryKeyStore,
    RecordRef,
    ResultNotStored,
    StoreUnavailable,
    result_for_key,
)
from tests.support.apps import store_down


class Declined(Exception):
    pass


def make_counting_task(app: Celery, **options: Any) -> tuple[Any, list[Any]]:
    calls: list[Any] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.charge", **options)
    def charge(self: Any, order_id: int, amount: int = 100) -> dict[str, Any]:
        calls.append((order_id, amount))
        return {"order_id": order_id, "amount": amount, "run": len(calls),
                "fence": self.request.idempotency_fence}

    return charge, calls


def store_of(task: Any) -> MemoryKeyStore:
    store = task.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return store


def test_explicit_key_runs_once_and_duplicates_get_the_cached_result(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    first = charge.apply_async((42,), idempotency_key="req-1")
    second = charge.apply_async((42,), idempotency_key="req-1")
    assert calls == [(42, 100)]
    assert second.id == first.id
    assert (first.duplicate, second.duplicate) == (False, True)
    fence = first.record().fence  # type: ignore[union-attr]
    assert first.get() == second.get() == {"order_id": 42, "amount": 100, "run": 1,
                                           "fence": fence}
    assert second.state == "SUCCESS" and second.successful()


def test_derived_key_ignores_how_arguments_are_passed(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    results = [charge.delay(7), charge.delay(order_id=7), charge.apply_async((7, 100)),
               charge.apply_async(kwargs={"amount": 100, "order_id": 7})]
    assert calls == [(7, 100)]
    assert len({r.id for r in results}) == 1
    assert [r.duplicate for r in results] == [False, True, True, True]


def test_same_key_with_other_arguments_is_a_mismatch(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    charge.apply_async((1,), idempotency_key="req")
    with pytest.raises(IdempotencyKeyMismatch) as info:
        charge.apply_async((2,), idempotency_key="req")
    assert info.value.key == "req" and calls == [(1, 100)]


def test_key_fields_dedupe_on_a_subset(app: Celery) -> None:
    charge, calls = make_counting_task(app, idempotency_key_fields=("order_id",))
    charge.delay(5, 100)
    with pytest.raises(IdempotencyKeyMismatch):  # same order, another amount: a client bug
        charge.delay(5, 200)
    assert calls == [(5, 100)]


def test_key_func_builds_the_key(app: Celery) -> None:
    charge, calls = make_counting_task(
        app, idempotency_key_func=lambda args, kwargs: f"order:{args[0]}")
    charge.delay(5)
    assert charge.result_for_key("order:5") is not None
    assert calls == [(5, 100)]


def test_require_key_refuses_to_publish_without_one(app: Celery) -> None:
    charge, calls = make_counting_task(app, idempotency_require_key=True)
    with pytest.raises(IdempotencyKeyRequired, match="explicit idempotency key"):
        charge.delay(1)
    assert charge.apply_async((1,), idempotency_key="k").get()["run"] == 1
    with pytest.raises(IdempotencyKeyRequired):  # also at execution, e.g. .apply()
        charge.apply((2,))
    assert calls == [(1, 100)]


@pytest.mark.parametrize("key", ["", "x" * 256, "bad\nkey", 42])
def test_bad_keys_are_refused_at_publish(app: Celery, key: Any) -> None:
    charge, calls = make_counting_task(app)
    with pytest.raises(InvalidIdempotencyKey):
        charge.apply_async((1,), idempotency_key=key)
    assert calls == []


def test_arguments_without_canonical_form_are_refused_at_publish(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    with pytest.raises(ArgumentsNotCanonical, match="order_id"):
        charge.delay(object())
    assert calls == []


def test_unknown_apply_async_option_is_an_error(app: Celery) -> None:
    charge, _ = make_counting_task(app)
    with pytest.raises(ConfigurationError, match="idempotency_tll"):
        charge.apply_async((1,), idempotency_tll=5)


def test_scope_shares_keys_between_tasks(app: Celery) -> None:
    calls: list[str] = []

    @app.task(shared=False, base=IdempotentTask, name="a", idempotency_scope="receipts")
    def task_a(order_id: int) -> str:
        calls.append("a")
        return "a"

    @app.task(shared=False, base=IdempotentTask, name="b", idempotency_scope="receipts")
    def task_b(order_id: int) -> str:
        calls.append("b")
        return "b"

    task_a.apply_async((1,), idempotency_key="order-1")
    duplicate = task_b.apply_async((1,), idempotency_key="order-1")
    assert calls == ["a"] and duplicate.duplicate and duplicate.get() == "a"
    found = result_for_key(app, "order-1", scope="receipts")
    assert found is not None and found.get() == "a"


def test_result_for_key_recovers_the_handle_from_the_key_alone(app: Celery) -> None:
    charge, _ = make_counting_task(app)
    sent = charge.apply_async((3,), idempotency_key="req-3")
    found = charge.result_for_key("req-3")
    assert found is not None and found.id == sent.id and found.get()["order_id"] == 3
    assert charge.result_for_key("unknown") is None


def test_cacheable_error_is_replayed_to_every_duplicate(app: Celery) -> None:
    calls: list[int] = []

    @app.task(shared=False, base=IdempotentTask, idempotency_cache_errors=(Declined,))
    def pay(order_id: int) -> None:
        calls.append(order_id)
        raise Declined(f"card declined for {order_id}")

    with pytest.raises(Declined):
        pay.delay(1)
    again = pay.delay(1)
    assert again.duplicate and calls == [1]
    with pytest.raises(Declined, match="card declined for 1"):
        again.get()
    assert isinstance(again.get(propagate=False), Declined)
    assert again.state == "FAILURE"


def test_other_errors_are_seen_by_handles_and_rerun_by_the_next_publish(app: Celery) -> None:
    app.conf.task_eager_propagates = False
    calls: list[int] = []

    @app.task(shared=False, base=IdempotentTask)
    def flaky(order_id: int) -> str:
        calls.append(order_id)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return "ok"

    first = flaky.delay(1)
    with pytest.raises(RuntimeError, match="transient"):
        first.get()
    second = flaky.delay(1)
    assert not second.duplicate and second.get() == "ok" and calls == [1, 1]
    # The handle given out first now sees the key's outcome: the re-run's result.
    assert first.get() == "ok"


def test_retry_keeps_the_key_and_does_not_spend_it(app: Celery) -> None:
    app.conf.task_eager_propagates = False  # else Celery itself raises Retry out of .delay()
    attempts: list[int] = []
    fences: list[int] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, max_retries=2)
    def once_more(self: Any, order_id: int) -> dict[str, int]:
        attempts.append(self.request.retries)
        fences.append(self.request.idempotency_fence)
        if len(attempts) == 1:
            raise self.retry(countdown=0)
        return {"retries": self.request.retries, "fence": self.request.idempotency_fence}

    result = once_more.apply_async((1,), idempotency_key="retry-1")
    assert result.get() == {"retries": 1, "fence": fences[1]}
    assert fences[1] > fences[0]  # the retry holds a new claim
    assert attempts == [0, 1]
    assert once_more.apply_async((1,), idempotency_key="retry-1").duplicate


def test_unserializable_result_still_records_success(app: Celery,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    sentinel = object()

    @app.task(shared=False, base=IdempotentTask)
    def makes_object(order_id: int) -> object:
        calls.append(order_id)
        return sentinel

    with caplog.at_level(logging.WARNING, logger="celery_idempotency"):
        first = makes_object.delay(1)
    assert "cannot be serialized" in caplog.text
    record = store_of(makes_object).get(RecordRef(makes_object.name, first.idempotency_key))
    assert record is not None and record.state is KeyState.SUCCEEDED
    assert first.get() is sentinel  # the eager handle holds the value itself
    duplicate = makes_object.delay(1)
    assert duplicate.duplicate and calls == [1]
    with pytest.raises(ResultNotStored, match="unserializable"):
        duplicate.get()


def test_result_over_the_size_cap_still_records_success(app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, idempotency_max_result_bytes=100)
    def big(order_id: int) -> str:
        return "x" * 1000

    big.delay(1)
    with pytest.raises(ResultNotStored, match="too_large"):
        big.delay(1).get()


def test_pickle_results_only_when_configured(app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, idempotency_result_serializer="pickle")
    def makes_set(order_id: int) -> set[int]:
        return {order_id}

    makes_set.delay(1)
    assert makes_set.delay(1).get() == {1}


def test_store_down_at_publish_fails_closed(app: Celery) -> None:
    store_down(app)
    charge, calls = make_counting_task(app)
    with pytest.raises(StoreUnavailable, match="unreachable") as info:
        charge.apply_async((1,), idempotency_key="k")
    assert info.value.key == "k" and calls == []


def test_store_down_with_fail_open_runs_with_a_warning(app: Celery,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store_down(app, idempotency_on_store_error="fail_open")
    charge, calls = make_counting_task(app)
    with caplog.at_level(logging.WARNING, logger="celery_idempotency"):
        charge.apply_async((1,), idempotency_key="k")
    assert calls == [(1, 100)] and "UNPROTECTED" in caplog.text


def test_disabled_tasks_run_every_time(app: Celery) -> None:
    charge, calls = make_counting_task(app, idempotency_enabled=False)
    charge.delay(1)
    charge.delay(1)
    assert calls == [(1, 100), (1, 100)]


def test_direct_calls_run_the_function_without_the_store(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    charge(1)
    charge(1)
    assert calls == [(1, 100), (1, 100)]
    assert list(store_of(charge).scan()) == []


def test_threads_publishing_one_key_run_it_once(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    # Evaluate Celery's lazy task proxy before the threads start: its first evaluation binds
    # the task class without a lock, and a thread that sees it half bound fails inside Celery
    # (request_stack still None), whatever the idempotency code does.
    assert charge.name == "tests.charge"
    barrier = threading.Barrier(32)
    results: list[Any] = []
    lock = threading.Lock()

    def publish() -> None:
        barrier.wait()
        result = charge.apply_async((9,), idempotency_key="burst")
        with lock:
            results.append(result)

    threads = [threading.Thread(target=publish) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(calls) == 1 and len(results) == 32
    assert len({r.id for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert all(r.get(timeout=5)["run"] == 1 for r in results)


def test_key_passed_as_a_task_argument_points_to_the_right_place(app: Celery) -> None:
    charge, calls = make_counting_task(app)
    with pytest.raises(ArgumentsNotCanonical, match=r"apply_async\(\.\.\., idempotency_key"):
        charge.delay(5, idempotency_key="k")
    assert calls == []


def test_handle_looked_up_by_key_is_not_a_duplicate_and_knows_its_task(app: Celery) -> None:
    charge, _ = make_counting_task(app)
    charge.apply_async((3,), idempotency_key="req-3")
    found = charge.result_for_key("req-3")
    assert found is not None and found.duplicate is False and found.name == "tests.charge"


def test_celerys_own_tasks_are_not_deduplicated_under_task_cls() -> None:
    # With task_cls=IdempotentTask every task of the app gets the class, Celery's own
    # plumbing too: a daily celery.backend_cleanup must run every day, not once per TTL.
    app = Celery("builtins", set_as_current=False,
                 task_cls="celery_idempotency:IdempotentTask")
    app.conf.update(task_always_eager=True, task_eager_propagates=True,
                    idempotency_store_url="memory://")

    @app.task(name="tests.user_task")
    def user_task() -> str:
        return "ran"

    app.finalize()
    cleanup = app.tasks["celery.backend_cleanup"]
    assert isinstance(cleanup, IdempotentTask) and not cleanup.idem_config().enabled
    first, second = cleanup.apply_async(), cleanup.apply_async()
    assert first.id != second.id
    assert app.tasks["tests.user_task"].idem_config().enabled
    assert user_task.apply_async().id == user_task.apply_async().id  # the user's task is
