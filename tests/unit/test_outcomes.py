"""Cached errors: how they are stored (`encode_error`) and replayed (`rebuild_error`).

A replay raises the cached error again, in a worker and in every `.get()`. It must never raise
an exception that steers Celery (a rebuilt WorkerLostError or Reject makes the worker requeue
the message on every replay), never run a constructor the user did not opt into, never import a
module named by the store, and never lose the outcome because the exception misbehaves.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from billiard.exceptions import (
    SoftTimeLimitExceeded,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery import Celery
from celery.backends.base import Backend
from celery.exceptions import (
    Ignore,
    MaxRetriesExceededError,
    Reject,
    Retry,
    TaskRevokedError,
    WorkerShutdown,
    WorkerTerminate,
)

from celery_idempotency import (
    ConfigurationError,
    IdempotencyError,
    IdempotentTask,
    KeyState,
    RecordRef,
    ReplayedTaskError,
    ResultNotStored,
    result_for_key,
)
from celery_idempotency.config import resolve
from celery_idempotency.outcomes import encode_error, is_control_flow, rebuild_error
from celery_idempotency.records import Record, ResultStatus
from tests.support.apps import eager_app

# -- helpers ------------------------------------------------------------------------------------

constructed: list[tuple[Any, ...]] = []  # every run of Audited.__init__


class Audited(Exception):
    """An exception whose constructor has a side effect (it counts its own runs)."""

    def __init__(self, *args: Any) -> None:
        constructed.append(args)
        super().__init__(*args)


class AuditedChild(Audited):
    pass


class Model:
    class DoesNotExist(Exception):
        """Nested like Django's ``Model.DoesNotExist``: found by its qualified name."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class Unrepresentable(Unprintable):
    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken too")


class ArgsRaise(Exception):
    @property  # type: ignore[override]
    def args(self) -> Any:
        raise RuntimeError("args is broken")


def name_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def record_with(error: dict[str, Any] | None) -> Record:
    return Record(store_key="idem:{x}", key="order-1", scope="tests.pay", task_name="tests.pay",
                  state=KeyState.FAILED, task_id="t-1", fingerprint="fp", owner=None,
                  lease_expires_ms=None, fence=1, result=None, content_type="application/json",
                  content_encoding="utf-8", result_status=ResultStatus.STORED, error=error,
                  retryable=False, created_ms=0, updated_ms=0)


def stored(exc: BaseException, **options: Any) -> Record:
    """``exc`` as a worker stores it, read back as a record."""
    return record_with(json.loads(encode_error(exc, **options)))


@pytest.fixture(autouse=True)
def no_constructions() -> Iterator[None]:
    constructed.clear()
    yield
    constructed.clear()


# -- control-flow exceptions are never rebuilt ---------------------------------------------------

CONTROL_FLOW = [Retry, Ignore, Reject, WorkerLostError, Terminated, TimeLimitExceeded,
                SoftTimeLimitExceeded, MemoryError, SystemExit,
                KeyboardInterrupt, GeneratorExit, WorkerShutdown, WorkerTerminate,
                asyncio.CancelledError]


@pytest.mark.parametrize("cls", CONTROL_FLOW, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("replayable", [(), (Exception,)], ids=["not-opted-in", "opted-in"])
def test_control_flow_exceptions_replay_as_replayed_task_error(
        cls: type[BaseException], replayable: tuple[type[BaseException], ...]) -> None:
    record = record_with({"type": name_of(cls), "message": "m", "args": ["m"]})
    replayed = rebuild_error(record, replayable=replayable)
    assert type(replayed) is ReplayedTaskError
    assert replayed.error_type == name_of(cls) and replayed.message == "m"
    assert is_control_flow(cls)


def test_a_hand_written_reject_record_is_not_rebuilt() -> None:
    record = record_with({"type": "celery.exceptions.Reject", "message": "m",
                          "args": ["m", True]})
    replayed = rebuild_error(record, replayable=(Exception,))
    assert type(replayed) is ReplayedTaskError
    assert replayed.error_type == "celery.exceptions.Reject" and replayed.error_args == ["m", True]


@pytest.mark.parametrize("exc", [MaxRetriesExceededError("gave up"), TaskRevokedError("revoked"),
                                 ResultNotStored("no result")], ids=lambda exc: type(exc).__name__)
def test_celerys_and_this_librarys_ordinary_errors_are_rebuilt_without_opting_in(
        exc: Exception) -> None:
    # Celery routes none of these specially (they are terminal errors, not instructions) and
    # their constructors run no user code: `except TaskRevokedError` works as with Celery.
    assert not is_control_flow(type(exc))
    replayed = rebuild_error(stored(exc))
    assert type(replayed) is type(exc) and replayed.args == exc.args


def test_only_the_trusted_packages_themselves_are_trusted() -> None:
    module = types.ModuleType("celeryx_lookalike")
    exec("class Boom(Exception):\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        replayed = rebuild_error(record_with({"type": "celeryx_lookalike.Boom", "message": "m",
                                              "args": ["m"]}))
    finally:
        del sys.modules[module.__name__]
    assert type(replayed) is ReplayedTaskError


def test_control_flow_and_non_exception_classes_cannot_be_listed_in_cache_errors() -> None:
    for cls in (Retry, Ignore, Reject, SystemExit, KeyboardInterrupt, WorkerShutdown):
        with pytest.raises(ConfigurationError, match="never cached") as raised:
            resolve({"idempotency_store_url": "memory://",
                     "idempotency_cache_errors": (cls,)}, {})
        assert cls.__qualname__ in str(raised.value)
    # Listed, these are cached; a replay raises them as ReplayedTaskError (tested above).
    config = resolve({"idempotency_store_url": "memory://",
                      "idempotency_cache_errors": (WorkerLostError, SoftTimeLimitExceeded)}, {})
    assert config.cache_errors == (WorkerLostError, SoftTimeLimitExceeded)


# -- user constructors run only when opted in ---------------------------------------------------

def test_a_user_class_not_opted_in_replays_without_running_its_constructor() -> None:
    record = stored(Audited("card declined", 42))
    assert len(constructed) == 1  # the original raise
    for _ in range(5):
        replayed = rebuild_error(record, replayable=(KeyError,))
        assert type(replayed) is ReplayedTaskError
        assert replayed.error_type == name_of(Audited)
        assert replayed.message == "('card declined', 42)"
        assert replayed.error_args == ["card declined", 42]
    assert len(constructed) == 1


def test_an_opted_in_class_is_rebuilt_with_its_stored_arguments() -> None:
    record = stored(Audited("card declined", 42))
    replayed = rebuild_error(record, replayable=(Audited,))
    assert type(replayed) is Audited and replayed.args == ("card declined", 42)
    assert constructed == [("card declined", 42), ("card declined", 42)]


def test_a_subclass_of_an_opted_in_class_is_rebuilt() -> None:
    replayed = rebuild_error(stored(AuditedChild("no")), replayable=(Audited,))
    assert type(replayed) is AuditedChild


def test_built_in_exceptions_are_rebuilt_without_opting_in() -> None:
    # No user code runs: `except KeyError` around .get() keeps working as in plain Celery.
    for exc in (ValueError("bad amount"), KeyError("order"), OSError(2, "gone")):
        replayed = rebuild_error(stored(exc))
        assert type(replayed) is type(exc) and replayed.args == exc.args


def test_a_constructor_that_rejects_the_stored_arguments_gives_the_stand_in() -> None:
    class NeedsTwo(Exception):
        def __init__(self, first: str, second: str) -> None:
            super().__init__(first)

    record = record_with({"type": name_of(NeedsTwo), "message": "x", "args": ["x"]})
    # A class defined in a function is not reachable by name either way.
    assert type(rebuild_error(record, replayable=(NeedsTwo,))) is ReplayedTaskError
    module = sys.modules[__name__]
    module.NeedsTwo = NeedsTwo  # type: ignore[attr-defined]
    NeedsTwo.__qualname__ = "NeedsTwo"
    try:
        record = record_with({"type": name_of(NeedsTwo), "message": "x", "args": ["x"]})
        assert type(rebuild_error(record, replayable=(NeedsTwo,))) is ReplayedTaskError
        record = record_with({"type": name_of(NeedsTwo), "message": "x", "args": ["x", "y"]})
        assert type(rebuild_error(record, replayable=(NeedsTwo,))) is NeedsTwo
    finally:
        del module.NeedsTwo  # type: ignore[attr-defined]


def test_args_that_were_not_stored_give_the_stand_in() -> None:
    record = record_with({"type": name_of(Audited), "message": "m", "args": None})
    assert type(rebuild_error(record, replayable=(Audited,))) is ReplayedTaskError
    assert constructed == []


# -- class lookup -------------------------------------------------------------------------------

def test_nested_classes_resolve_by_qualified_name() -> None:
    record = stored(Model.DoesNotExist("order 7 does not exist"))
    assert record.error is not None
    assert record.error["type"] == f"{__name__}.Model.DoesNotExist"
    replayed = rebuild_error(record, replayable=(Model.DoesNotExist,))
    assert type(replayed) is Model.DoesNotExist and str(replayed) == "order 7 does not exist"


def test_a_module_named_by_the_store_is_never_imported() -> None:
    name = "celery_idempotency_never_imported_module"
    assert name not in sys.modules
    replayed = rebuild_error(record_with({"type": f"{name}.Boom", "message": "m", "args": []}),
                             replayable=(Exception,))
    assert type(replayed) is ReplayedTaskError and name not in sys.modules


def test_lookup_runs_no_module_getattr_and_accepts_no_alias_or_non_class() -> None:
    asked: list[str] = []
    module = types.ModuleType("celery_idempotency_lazy_module")

    def lazy(attribute: str) -> Any:  # PEP 562: could import anything
        asked.append(attribute)
        return Audited

    module.__getattr__ = lazy  # type: ignore[method-assign]
    module.Alias = Audited  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        for type_name in (f"{module.__name__}.Lazy", f"{module.__name__}.Alias", "os.system",
                          "os.error", "builtins.print", "", "...", "builtins."):
            replayed = rebuild_error(record_with({"type": type_name, "message": "m",
                                                  "args": ["rm -rf /"]}),
                                     replayable=(Exception,))
            assert type(replayed) is ReplayedTaskError, type_name
    finally:
        del sys.modules[module.__name__]
    assert asked == [] and constructed == []


@pytest.mark.parametrize("error", [None, {}, {"type": 42, "message": ["x"], "args": "x"},
                                   {"type": "builtins.ValueError", "message": None,
                                    "args": {"a": 1}}])
def test_malformed_error_fields_give_the_stand_in(error: Any) -> None:
    replayed = rebuild_error(record_with(error))
    assert type(replayed) is ReplayedTaskError and isinstance(replayed.message, str)


# -- size cap -----------------------------------------------------------------------------------

def test_a_huge_message_is_truncated_to_the_cap_and_says_so() -> None:
    cap = 512 * 1024
    message = "x" * (5 * 1024 * 1024)
    text = encode_error(ValueError(message), max_bytes=cap)
    assert len(text.encode()) <= cap
    document = json.loads(text)
    assert document["type"] == "builtins.ValueError" and document["truncated"] is True
    assert document["args"] is None and document["args_dropped"] is True
    assert document["message"].startswith("x" * 1000)
    assert document["message"].endswith(
        f"[truncated by celery-idempotency: the message had {len(message)} characters, "
        f"over idempotency_max_result_bytes={cap}]")
    replayed = rebuild_error(record_with(document))
    assert type(replayed) is ReplayedTaskError and "truncated" in replayed.message


def test_non_ascii_messages_are_cut_by_their_encoded_size() -> None:
    text = encode_error(ValueError("\U0001F4A5é" * 100_000), max_bytes=10_000)
    assert len(text.encode()) <= 10_000 and json.loads(text)["truncated"] is True


def test_large_arguments_are_dropped_first_and_the_message_kept() -> None:
    class Summarised(Exception):
        def __str__(self) -> str:
            return "upload rejected"

    document = json.loads(encode_error(Summarised("y" * 100_000), max_bytes=1000))
    assert document["args"] is None and document["args_dropped"] is True
    assert "truncated" not in document and document["message"] == "upload rejected"
    assert len(json.dumps(document)) <= 1000


def test_a_cap_smaller_than_the_type_name_still_stores_the_type() -> None:
    document = json.loads(encode_error(ValueError("m" * 100), max_bytes=10))
    assert document["type"] == "builtins.ValueError" and document["truncated"] is True


def test_the_task_stores_errors_under_its_max_result_bytes() -> None:
    app = eager_app("cap", idempotency_max_result_bytes=4096)

    @app.task(shared=False, base=IdempotentTask, name="tests.shout")
    def shout() -> None:
        raise ValueError("!" * 5_000_000)

    shout.apply(headers={"idempotency_key": "k"})
    record = shout.idem_store().get(RecordRef("tests.shout", "k"))
    assert record is not None and record.state is KeyState.FAILED and record.error is not None
    assert len(json.dumps(record.error)) <= 4096 and record.error["truncated"] is True


# -- misbehaving exceptions still record the outcome -------------------------------------------

def test_a_failing_str_falls_back_to_repr() -> None:
    document = json.loads(encode_error(Unprintable("a", 1)))
    assert document == {"type": name_of(Unprintable), "message": "Unprintable('a', 1)",
                        "args": ["a", 1]}


def test_failing_str_and_repr_give_a_placeholder() -> None:
    document = json.loads(encode_error(Unrepresentable()))
    assert document["message"] == (f"<unprintable {name_of(Unrepresentable)}: "
                                   "repr() raised RuntimeError>")


@pytest.mark.parametrize("exc", [ArgsRaise("x"), ValueError(object()), ValueError(b"bytes")],
                         ids=["args-raises", "object", "bytes"])
def test_arguments_that_are_not_json_are_left_out(exc: BaseException) -> None:
    assert json.loads(encode_error(exc))["args"] is None


def test_recursive_and_deep_arguments_are_left_out() -> None:
    loop: list[Any] = []
    loop.append(loop)
    deep: list[Any] = []
    cursor = deep
    for _ in range(100_000):
        cursor.append([])
        cursor = cursor[0]
    assert json.loads(encode_error(ValueError(loop)))["args"] is None
    assert json.loads(encode_error(ValueError(deep)))["args"] is None


def test_a_task_raising_an_unprintable_error_still_records_a_retryable_failure() -> None:
    app = eager_app("unprintable")
    runs: list[int] = []

    @app.task(shared=False, base=IdempotentTask, name="tests.broken")
    def broken() -> None:
        runs.append(1)
        raise Unrepresentable()

    first = broken.apply(headers={"idempotency_key": "k"})
    assert isinstance(first.result, Unrepresentable)
    record = broken.idem_store().get(RecordRef("tests.broken", "k"))
    assert record is not None and record.state is KeyState.FAILED and record.retryable
    assert record.error is not None and record.error["type"] == name_of(Unrepresentable)
    broken.apply(headers={"idempotency_key": "k"})  # retryable: the next message runs it
    assert runs == [1, 1]


# -- ReplayedTaskError --------------------------------------------------------------------------

def test_replayed_task_error_is_useful_to_except_on() -> None:
    replayed = rebuild_error(stored(Audited("card declined")))
    with pytest.raises(IdempotencyError):
        raise replayed
    assert isinstance(replayed, ReplayedTaskError)
    assert replayed.error_type == name_of(Audited) and replayed.message == "card declined"
    assert replayed.key == "order-1" and replayed.task_id == "t-1"
    assert str(replayed) == (f"{name_of(Audited)}: card declined "
                             "(key='order-1', task_id='t-1')")


def test_replayed_task_error_survives_pickle_and_celerys_json_result_backend() -> None:
    replayed = ReplayedTaskError("declined", "shop.Declined", error_args=["declined"],
                                 key="k", task_id="t")
    copy = pickle.loads(pickle.dumps(replayed))
    assert (type(copy), copy.message, copy.error_type, copy.error_args, copy.key,
            copy.task_id) == (ReplayedTaskError, "declined", "shop.Declined", ["declined"],
                              "k", "t")
    backend = Backend(app=Celery("backend", set_as_current=False), serializer="json")
    through = backend.exception_to_python(
        json.loads(json.dumps(backend.prepare_exception(replayed, "json"))))
    assert type(through) is ReplayedTaskError and through.error_type == "shop.Declined"


# -- a task and its handles replay under the same rules -----------------------------------------

@pytest.mark.parametrize("opted_in", [True, False])
def test_replays_run_a_constructor_only_as_often_as_opted_in(opted_in: bool) -> None:
    app = eager_app("replays")
    options = {"idempotency_cache_errors": (Audited,)} if opted_in else {}
    runs: list[int] = []

    @app.task(shared=False, base=IdempotentTask, name="tests.audited", **options)
    def audited() -> None:
        runs.append(1)
        raise Audited("declined")

    first = audited.apply_async(idempotency_key="k")
    # Celery itself copies a raised exception (pickle round trip: the constructor runs again).
    celery_copies = len(constructed) - 1
    assert runs == [1] and celery_copies >= 0

    before = len(constructed)
    for _ in range(3):
        error = first.get(propagate=False)
        assert type(error) is (Audited if opted_in else ReplayedTaskError)
    assert len(constructed) - before == (3 if opted_in else 0)

    # Duplicate messages of a key whose error is cached (for the task that does not list
    # Audited: a record written while it did, e.g. by an earlier deploy).
    key = "k"
    if not opted_in:
        key = "cached-elsewhere"
        store = audited.idem_store()
        context = audited.key_target((), {}, key=key, message_options={})
        store.reserve(context.ref, task_id="t0", fingerprint=context.fingerprint,
                      task_name=audited.name, ttl_ms=60_000)
        store.claim(context.ref, task_id="t0", owner="o", fingerprint=context.fingerprint,
                    task_name=audited.name, lease_ms=60_000, ttl_ms=60_000)
        store.fail(context.ref, owner="o", error=encode_error(Audited("declined")),
                   retryable=False, ttl_ms=60_000)
    before = len(constructed)
    for _ in range(3):
        replay = audited.apply(headers={"idempotency_key": key})
        assert type(replay.result) is (Audited if opted_in else ReplayedTaskError)
    assert runs == [1]
    assert len(constructed) - before == (3 * (1 + celery_copies) if opted_in else 0)


def test_a_handle_rebuilt_from_the_key_alone_follows_the_tasks_opt_in() -> None:
    app = eager_app("lookup")

    @app.task(shared=False, base=IdempotentTask, name="tests.pay",
              idempotency_cache_errors=(Audited,))
    def pay() -> None:
        raise Audited("declined")

    @app.task(shared=False, base=IdempotentTask, name="tests.refund")
    def refund() -> None:
        raise Audited("declined")

    pay.apply_async(idempotency_key="k")
    refund.apply_async(idempotency_key="k")
    paid = result_for_key(app, "k", scope="tests.pay")
    refunded = result_for_key(app, "k", scope="tests.refund")
    assert paid is not None and refunded is not None
    assert type(paid.get(propagate=False)) is Audited
    assert type(refunded.get(propagate=False)) is ReplayedTaskError
    assert type(pay.result_for_key("k").get(propagate=False)) is Audited  # type: ignore[union-attr]
