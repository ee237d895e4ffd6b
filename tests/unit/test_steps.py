"""Recovery points (`IdempotentTask.step`, `step_key`) in eager mode on the memory store: the
task body runs in the test's process, under the same protocol as on a worker."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from celery import Celery
from celery._state import _set_task_join_will_block, task_join_will_block

from celery_idempotency import (
    IdempotencyError,
    IdempotentTask,
    InvalidStep,
    KeyState,
    MemoryKeyStore,
    OwnershipLost,
    RecordRef,
    StepValueNotStored,
    StoreUnavailable,
    events,
)
from celery_idempotency.config import IdempotencyConfig
from celery_idempotency.protocol import STORE_ATTEMPT_HEADER, Execution, KeyTarget, NoOutcome
from celery_idempotency.records import F_FENCE, F_OWNER
from celery_idempotency.steps import MAX_STEP_NAME, step_key
from celery_idempotency.store import KeyStore
from tests.support.services import free_port

SCOPE = "tests.checkout"


class Declined(Exception):
    pass


class Ledger:
    """The side effects of the test's checkout, and what to break on the next run."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_at: str | None = None
        self.during: dict[str, Any] = {}  # step name -> callable run inside that step

    def effect(self, name: str, value: Any) -> Any:
        self.calls.append(name)
        if name in self.during:
            self.during.pop(name)()
        if self.fail_at == name:
            raise Declined(f"{name} failed")
        return value


def make_checkout(app: Celery, **options: Any) -> tuple[Any, Ledger]:
    ledger = Ledger()

    @app.task(shared=False, base=IdempotentTask, bind=True, acks_late=True, name=SCOPE,
              **options)
    def checkout(self: Any, order_id: int) -> dict[str, Any]:
        charge = self.step("charge", ledger.effect, "charge", {"id": f"ch_{order_id}"})
        order = self.step("order", ledger.effect, "order", order_id * 10)
        self.step("receipt", ledger.effect, "receipt", None)
        return {"charge": charge["id"], "order": order, "key": self.step_key("charge")}

    return checkout, ledger


def store_of(task: Any) -> MemoryKeyStore:
    store = task.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return store


def record_of(task: Any, key: str) -> Any:
    return store_of(task).get(RecordRef(SCOPE, key))


@pytest.fixture
def heard() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    received: list[tuple[str, dict[str, Any]]] = []
    events.subscribe("test.steps", lambda event, sender, fields: received.append(
        (event, fields)))
    yield received
    events.unsubscribe("test.steps")


# -- recorded steps are not run again --------------------------------------------------------

def test_a_failed_run_is_continued_by_the_next_publish_where_it_stopped(app: Celery) -> None:
    checkout, ledger = make_checkout(app)
    ledger.fail_at = "receipt"
    with pytest.raises(Declined):
        checkout.apply_async((7,), idempotency_key="order-7")
    record = record_of(checkout, "order-7")
    assert record.state is KeyState.FAILED and record.retryable
    assert record.steps == ("charge", "order")  # the failed step recorded nothing
    ledger.fail_at = None
    result = checkout.apply_async((7,), idempotency_key="order-7")
    assert result.get()["charge"] == "ch_7" and result.get()["order"] == 70
    # charge and order ran once; receipt ran twice (it raised the first time).
    assert ledger.calls == ["charge", "order", "receipt", "receipt"]
    record = record_of(checkout, "order-7")
    assert record.state is KeyState.SUCCEEDED and record.steps == ()  # final: steps dropped


def test_a_retry_continues_from_the_recorded_steps(app: Celery) -> None:
    app.conf.task_eager_propagates = False  # else Celery itself raises Retry out of .delay()
    ledger = Ledger()

    @app.task(shared=False, base=IdempotentTask, bind=True, max_retries=2, name=SCOPE)
    def checkout(self: Any, order_id: int) -> str:
        charge = self.step("charge", ledger.effect, "charge", "ch_1")
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return str(charge)

    assert checkout.apply_async((1,), idempotency_key="r-1").get() == "ch_1"
    assert ledger.calls == ["charge"]


def test_a_cached_error_drops_the_steps(app: Celery) -> None:
    checkout, ledger = make_checkout(app, idempotency_cache_errors=(Declined,))
    ledger.fail_at = "order"
    with pytest.raises(Declined):
        checkout.apply_async((1,), idempotency_key="k")
    record = record_of(checkout, "k")
    assert record.state is KeyState.FAILED and not record.retryable and record.steps == ()


def test_a_step_that_raises_records_nothing_and_may_be_tried_again_in_the_run(
        app: Celery) -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("try again")
        return "done"

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def looping(self: Any, order_id: int) -> str:
        for _ in range(5):  # a retry loop inside the task: the same name until it lands
            try:
                return str(self.step("call", flaky))
            except ConnectionError:
                continue
        return "gave up"

    assert looping.apply_async((1,), idempotency_key="k").get() == "done"
    assert len(attempts) == 3


def test_a_values_round_trip_through_the_serializer(app: Celery) -> None:
    seen: list[Any] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def typed(self: Any, order_id: int) -> None:
        seen.append(self.step("value", lambda: {"a": [1, 2.5, None, "ü"], "b": True}))
        raise Declined("again")

    for _ in range(2):
        with pytest.raises(Declined):
            typed.apply_async((1,), idempotency_key="k")
    assert seen == [{"a": [1, 2.5, None, "ü"], "b": True}] * 2


def test_pickle_values_when_the_results_are_pickled(app: Celery) -> None:
    seen: list[Any] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE,
              idempotency_result_serializer="pickle")
    def typed(self: Any, order_id: int) -> None:
        seen.append(self.step("value", lambda: {1, 2}))
        raise Declined("again")

    for _ in range(2):
        with pytest.raises(Declined):
            typed.apply_async((1,), idempotency_key="k")
    assert seen == [{1, 2}, {1, 2}]


# -- misuse is a clear error -----------------------------------------------------------------

def test_a_repeated_step_name_is_an_error(app: Celery) -> None:
    ledger = Ledger()

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def twice(self: Any, order_id: int) -> None:
        self.step("charge", ledger.effect, "first", 1)
        self.step("charge", ledger.effect, "second", 2)

    with pytest.raises(InvalidStep, match="step 'charge' already ran in this run") as info:
        twice.apply_async((1,), idempotency_key="k")
    assert isinstance(info.value, IdempotencyError) and info.value.key == "k"
    assert ledger.calls == ["first"]


@pytest.mark.parametrize(("name", "why"), [
    ("", "must not be empty"), ("x" * (MAX_STEP_NAME + 1), "characters long"),
    ("a\nb", "control character U+000A"), ("nul\0", "control character U+0000"),
    (b"bytes", "must be a string, not bytes"), (None, "must be a string, not NoneType"),
])
def test_bad_step_names_are_refused_before_the_step_runs(app: Celery, name: Any,
                                                         why: str) -> None:
    ledger = Ledger()

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def named(self: Any, order_id: int) -> None:
        self.step(name, ledger.effect, "ran", 1)

    with pytest.raises(InvalidStep, match=re.escape(why)):
        named.apply_async((1,), idempotency_key="k")
    with pytest.raises(InvalidStep, match=re.escape(why)):
        named(1)  # also outside a claim
    assert ledger.calls == []


def test_a_value_the_serializer_refuses_is_a_clear_error_and_records_nothing(
        app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def makes_object(self: Any, order_id: int) -> None:
        self.step("charge", object)

    with pytest.raises(StepValueNotStored, match=r"step 'charge' ran, but its value cannot be "
                                                 r"serialized with 'json'") as info:
        makes_object.apply_async((1,), idempotency_key="k")
    assert info.value.key == "k"
    assert record_of(makes_object, "k").steps == ()


def test_a_value_over_the_size_cap_is_a_clear_error_and_records_nothing(app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE,
              idempotency_max_result_bytes=100)
    def big(self: Any, order_id: int) -> None:
        self.step("charge", lambda: "x" * 1000)

    with pytest.raises(StepValueNotStored, match=r"is 1002 bytes, over "
                                                 r"idempotency_max_result_bytes=100"):
        big.apply_async((1,), idempotency_key="k")
    assert record_of(big, "k").steps == ()


def test_step_passes_keyword_arguments_named_like_its_own_parameters(app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def kw(self: Any, order_id: int) -> Any:
        return self.step("s", lambda name, fn: [name, fn], name="n", fn="f")

    assert kw.apply_async((1,), idempotency_key="k").get() == ["n", "f"]


# -- outside a claim a step just runs ----------------------------------------------------------

def test_a_direct_call_just_runs_the_steps(app: Celery) -> None:
    checkout, ledger = make_checkout(app)
    first, second = checkout(3), checkout(3)
    assert ledger.calls == ["charge", "order", "receipt"] * 2
    assert list(store_of(checkout).scan()) == []
    # step_key derives the key from the arguments, as a publish would.
    published = checkout.apply_async((3,))
    assert first["key"] == second["key"] == published.get()["key"]


def test_a_disabled_task_just_runs_the_steps(app: Celery) -> None:
    checkout, ledger = make_checkout(app, idempotency_enabled=False)
    checkout.delay(1)
    checkout.delay(1)
    assert ledger.calls == ["charge", "order", "receipt"] * 2


def test_step_outside_any_task_run_just_calls(app: Celery) -> None:
    checkout, ledger = make_checkout(app)
    assert checkout.step("charge", ledger.effect, "charge", 5) == 5
    with pytest.raises(IdempotencyError, match="step_key\\(\\) needs one"):
        checkout.step_key("charge")


def test_fail_open_runs_the_steps_unprotected(app: Celery,
                                              caplog: pytest.LogCaptureFixture) -> None:
    app.conf.idempotency_store_url = f"redis://127.0.0.1:{free_port()}/0"
    app.conf.idempotency_store_timeout = 0.2
    app.conf.idempotency_on_store_error = "fail_open"
    checkout, ledger = make_checkout(app)
    with caplog.at_level(logging.WARNING, logger="celery_idempotency"):
        result = checkout.apply_async((1,), idempotency_key="k")
    assert "UNPROTECTED" in caplog.text
    assert ledger.calls == ["charge", "order", "receipt"]
    assert result.get()["key"] == step_key(RecordRef(SCOPE, "k"), "charge")


def test_steps_of_one_thread_never_leak_into_another(app: Celery) -> None:
    """Two runs at once in two threads: each sees its own steps only."""
    barrier = threading.Barrier(2, timeout=60)
    results: dict[int, Any] = {}

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def parallel(self: Any, order_id: int) -> Any:
        first = self.step("a", lambda: order_id)
        barrier.wait()  # both runs are inside their task now
        second = self.step("b", lambda: order_id * 100)
        return [first, second, self.step_key("a")]

    def run(order_id: int) -> None:
        # Read once both threads are done (below): while the other thread's apply() runs,
        # Celery refuses .get() process-wide.
        results[order_id] = parallel.apply_async((order_id,), idempotency_key=f"k{order_id}")

    threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    # Celery's eager apply() sets and resets a process-wide "joining would block" flag
    # (denied_join_result); two at once can leave it set, failing later tests' .get().
    blocks = task_join_will_block()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    finally:
        _set_task_join_will_block(blocks)
    results = {order_id: handle.get() for order_id, handle in results.items()}
    assert results[1][:2] == [1, 100] and results[2][:2] == [2, 200]
    assert results[1][2] == step_key(RecordRef(SCOPE, "k1"), "a") != results[2][2]


# -- step_key ----------------------------------------------------------------------------------

def test_step_key_is_stable_per_key_and_name_and_differs_otherwise() -> None:
    ref = RecordRef("tasks.checkout", "order-7")
    key = step_key(ref, "charge")
    assert key == step_key(RecordRef("tasks.checkout", "order-7"), "charge")
    assert len(key) == 36 and re.fullmatch(r"[0-9a-f-]{36}", key)
    parsed = uuid.UUID(key)
    assert parsed.version == 8 and parsed.variant == uuid.RFC_4122
    others = {step_key(RecordRef("tasks.refund", "order-7"), "charge"),
              step_key(RecordRef("tasks.checkout", "order-8"), "charge"),
              step_key(ref, "refund"),
              # No ambiguity where one part ends and the next begins.
              step_key(RecordRef("tasks.checkout", "order-7c"), "harge"),
              step_key(RecordRef("tasks.checkou", "torder-7"), "charge")}
    assert key not in others and len(others) == 5
    with pytest.raises(InvalidStep):
        step_key(ref, "")


def test_step_key_is_the_same_on_every_attempt_of_the_key(app: Celery) -> None:
    keys: list[str] = []

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def attempt(self: Any, order_id: int) -> None:
        keys.append(self.step_key("charge"))
        if len(keys) < 3:
            raise Declined("again")

    for _ in range(3):
        with contextlib.suppress(Declined):
            attempt.apply_async((1,), idempotency_key="k")
    assert keys == [step_key(RecordRef(SCOPE, "k"), "charge")] * 3


# -- the claim is checked before every step ----------------------------------------------------

def _take_over(store: MemoryKeyStore, ref: RecordRef) -> None:
    """What a take-over does to the record: a new owner, a higher fence (written directly: a
    real take-over needs the lease to run out first)."""
    record = store.get(ref)
    assert record is not None
    fields = dict(store._records[store.store_key(ref)])
    fields.update({F_OWNER: b"intruder", F_FENCE: str(record.fence + 1).encode()})
    store.put_raw(ref, fields)


def test_a_run_that_lost_its_claim_stops_at_the_next_step_and_writes_nothing(
        app: Celery, heard: list[tuple[str, dict[str, Any]]]) -> None:
    ledger = Ledger()

    @app.task(shared=False, base=IdempotentTask, bind=True, name=SCOPE)
    def checkout(self: Any, order_id: int) -> None:
        self.step("charge", ledger.effect, "charge", 1)
        _take_over(store_of(checkout), RecordRef(SCOPE, "k"))
        self.step("order", ledger.effect, "order", 2)

    with pytest.raises(OwnershipLost, match="cannot run step 'order'"):
        checkout.apply_async((1,), idempotency_key="k")
    assert ledger.calls == ["charge"]  # order never started
    record = record_of(checkout, "k")
    # Nothing written over the new owner: no outcome; the charge is there for it to use.
    assert record.state is KeyState.STARTED and record.owner == "intruder"
    assert record.steps == ("charge",) and record.error is None
    lost = [fields for event, fields in heard if event == events.OWNERSHIP_LOST]
    assert lost == [{"key": "k", "scope": SCOPE, "task_id": lost[0]["task_id"],
                     "action": "step order"}]


def test_a_step_whose_claim_was_taken_over_while_it_ran_is_not_recorded(
        app: Celery, heard: list[tuple[str, dict[str, Any]]]) -> None:
    checkout, ledger = make_checkout(app)
    ledger.during["charge"] = lambda: _take_over(store_of(checkout), RecordRef(SCOPE, "k"))
    with pytest.raises(OwnershipLost, match="cannot record step 'charge'"):
        checkout.apply_async((1,), idempotency_key="k")
    assert ledger.calls == ["charge"]  # at-least-once: the new owner runs it again
    record = record_of(checkout, "k")
    assert record.owner == "intruder" and record.steps == () and record.error is None
    assert [event for event, _ in heard].count(events.OWNERSHIP_LOST) == 1


# -- the store cannot be reached at a step: the message comes back later ------------------------

class ComeBackLater(Exception):
    def __init__(self, delay: float, headers: Mapping[str, Any]) -> None:
        super().__init__(delay, headers)
        self.delay, self.headers = delay, headers


class UnreachableAtSteps(MemoryKeyStore):
    """A memory store that cannot be reached from the first step on."""

    def begin_step(self, *args: Any, **kwargs: Any) -> bytes | None:
        raise StoreUnavailable("store unreachable (test)")


class PlainExecution(Execution):
    """The protocol with the simplest hooks: the task is ``body(steps)``."""

    def __init__(self, store: KeyStore, body: Any) -> None:
        config = IdempotencyConfig(store_url="memory://", store_write_timeout=1.0)
        super().__init__(KeyTarget(RecordRef(SCOPE, "k"), "fp", config), sender=None,
                         task_name=SCOPE, task_id="t1", lease_ms=60_000, store_attempt=2)
        self.store, self.body = store, body

    def open_store(self, config: IdempotencyConfig) -> KeyStore:
        return self.store

    def run_task(self) -> Any:
        return self.body(self.steps)

    def no_outcome(self, exc: BaseException) -> NoOutcome | None:
        return NoOutcome.retry(0) if isinstance(exc, ComeBackLater) else None

    def accept_for(self, serializer: str) -> Any:
        return ["application/json"]

    def message_requeues(self) -> bool:
        return True

    def republish_later(self, delay: float, extra_headers: Mapping[str, Any]) -> BaseException:
        return ComeBackLater(delay, extra_headers)


def test_a_step_that_cannot_reach_the_store_neither_runs_nor_loses_the_message() -> None:
    store = UnreachableAtSteps()
    calls: list[str] = []
    execution = PlainExecution(store, lambda steps: steps.run("charge", calls.append,
                                                              ("ran",), {}))
    with pytest.raises(ComeBackLater) as info:
        execution.execute()
    assert calls == []
    assert info.value.headers == {STORE_ATTEMPT_HEADER: 3}  # the claim's backoff, one more
    assert info.value.delay == 0.5 * 2 ** 2
    record = store.get(RecordRef(SCOPE, "k"))
    assert record is not None and record.state is KeyState.PENDING  # ready for its return


def test_a_lease_that_ran_out_before_a_step_sends_the_message_back_to_continue() -> None:
    """The lease keeper could not renew in time; nobody took over yet. The next step does not
    start; the key goes back to pending with its steps, for the message sent again at once."""
    now_us = [1_800_000_000_000_000]
    store = MemoryKeyStore(clock_us=lambda: now_us[0])
    calls: list[str] = []

    def body(steps: Any) -> None:
        steps.run("charge", calls.append, ("charge",), {})
        now_us[0] += 61_000_000  # past the 60 s lease
        steps.run("order", calls.append, ("order",), {})

    with pytest.raises(ComeBackLater) as info:
        PlainExecution(store, body).execute()
    assert calls == ["charge"]
    assert (info.value.delay, dict(info.value.headers)) == (0.0, {})
    record = store.get(RecordRef(SCOPE, "k"))
    assert record is not None and record.state is KeyState.PENDING
    assert record.steps == ("charge",)
    # The message, back: continues with the order, the charge is not made again.
    calls.clear()

    def again(steps: Any) -> str:
        steps.run("charge", calls.append, ("charge",), {})
        steps.run("order", calls.append, ("order",), {})
        return "done"

    assert PlainExecution(store, again).execute() == "done"
    assert calls == ["order"]


class SavesFailAtFirst(MemoryKeyStore):
    """A memory store whose step saves are refused as unreachable ``failures`` times."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.saves = 0

    def save_step(self, *args: Any, **kwargs: Any) -> None:
        self.saves += 1
        if self.saves <= self.failures:
            raise StoreUnavailable("store unreachable (test)")
        super().save_step(*args, **kwargs)


def test_a_step_save_is_retried_while_the_store_is_briefly_unreachable() -> None:
    store = SavesFailAtFirst(failures=2)
    calls: list[str] = []
    assert PlainExecution(store, lambda steps: steps.run(
        "charge", lambda: calls.append("charge") or "ch_1", (), {})).execute() == "ch_1"
    assert calls == ["charge"] and store.saves == 3


def test_a_step_save_that_never_lands_sends_the_message_back() -> None:
    """After idempotency_store_write_timeout (1 s here) the run ends like a retry; the step
    was not recorded, so the next attempt runs it again (at-least-once)."""
    store = SavesFailAtFirst(failures=10**9)
    calls: list[str] = []
    with pytest.raises(ComeBackLater) as info:
        PlainExecution(store, lambda steps: steps.run(
            "charge", lambda: calls.append("charge"), (), {})).execute()
    assert calls == ["charge"] and store.saves > 1
    assert info.value.headers == {STORE_ATTEMPT_HEADER: 3}
    record = store.get(RecordRef(SCOPE, "k"))
    assert record is not None and record.state is KeyState.PENDING and record.steps == ()
