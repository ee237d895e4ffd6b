"""Every use of Celery's private surface, in one place.

The worker hooks that give a claim back when a pool child dies or a task is revoked override
private methods of ``celery.worker.request.Request``; a Celery release that renames one of them
would not fail: the override would simply never be called again, and keys would wait out their
leases after every crash. So each private name we rely on is listed in `PRIVATE_SURFACE`, with
the parameters we call or override it with and the Celery version that introduced it:

- importing this module warns (``RuntimeWarning``, once) when the installed Celery lacks one or
  has changed its parameters, naming what stops working;
- ``tests/unit/test_celery_compat.py`` fails on the same finding, on every Celery of the test
  matrix (see ``noxfile.py``).

Where Celery versions differ, the feature is detected here (`RETRIES_ON_WORKER_LOST`) rather
than in the modules that use it.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import celery
from celery import Task, _state, chord, group
from celery.result import AsyncResult
from celery.worker.request import Request

#: Celery's (major, minor), e.g. ``(5, 7)``.
CELERY_VERSION: tuple[int, int] = (int(celery.VERSION.major), int(celery.VERSION.minor))


@dataclass(frozen=True)
class PrivateName:
    """One private attribute of Celery that celery-idempotency relies on."""

    owner: Any
    name: str
    #: Parameter names after ``self`` for a method or function; None for a plain attribute.
    parameters: tuple[str, ...] | None
    #: What stops working without it (shown in the warning and the test failure).
    purpose: str
    #: First Celery (major, minor) that has it; older releases lack it and the feature is off.
    since: tuple[int, int] = (5, 4)
    #: False: ``parameters`` are the leading ones only (later releases added more after them).
    exact: bool = True

    @property
    def where(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}" \
            if isinstance(self.owner, type) else f"{self.owner.__name__}.{self.name}"


PRIVATE_SURFACE: tuple[PrivateName, ...] = (
    PrivateName(Request, "_announce_revoked", ("reason", "terminated", "signum", "expired"),
                "a revoked or expired task gives its key up at once (worker.IdempotentRequest)"),
    PrivateName(Request, "_retry_worker_lost", ("exc", "exc_info"),
                "task_retry_on_worker_lost: the claim is handed back before Celery re-sends the "
                "task (worker.IdempotentRequest)", since=(5, 7)),
    PrivateName(Request, "_already_revoked", None,
                "a revoked task's failure is not taken for a lost child (worker.py)"),
    PrivateName(Request, "_already_cancelled", None,
                "a cancelled task's failure is not taken for a lost child (worker.py)"),
    PrivateName(AsyncResult, "_get_task_meta", (),
                "IdempotentResult.state/.result/.ready() read the key store (result.py)"),
    PrivateName(_state, "get_current_worker_task", (),
                "a retry of the running task is re-published, not deduplicated (task.py)"),
    PrivateName(Task, "_dump_pydantic_arguments", None,
                "a pydantic=True task's key is derived from the arguments as sent (task.py)",
                since=(5, 7)),
    # Celery 5.6 added group_index after kwargs: the leading parameters are what we pass.
    PrivateName(group, "_apply_tasks", ("tasks", "producer", "app", "p"),
                "the members of an IdempotentGroup reserve their keys in one round trip "
                "(canvas.py)", exact=False),
)

# The public Request methods that IdempotentRequest overrides: a changed signature would make
# Celery's call fail in the worker's main process, so they are checked the same way.
OVERRIDDEN_PUBLIC: tuple[PrivateName, ...] = (
    PrivateName(Request, "on_failure", ("exc_info", "send_failed_event", "return_ok"),
                "a dead pool child's claim is given up (worker.IdempotentRequest)"),
    PrivateName(Request, "on_timeout", ("soft", "timeout"),
                "a hard time limit's claim is given up (worker.IdempotentRequest)"),
    PrivateName(Request, "reject", ("requeue",),
                "a requeued message's claim goes back to pending (worker.IdempotentRequest)"),
    PrivateName(chord, "run", ("header", "body", "partial_args"),
                "the header of an IdempotentChord is an IdempotentGroup (canvas.py)",
                exact=False),
)


def _parameters(target: Any) -> tuple[str, ...]:
    names = tuple(inspect.signature(target).parameters)
    return names[1:] if names[:1] == ("self",) else names


def problem_with(item: PrivateName) -> str | None:
    """Why ``item`` cannot be relied on in the installed Celery, or None when it can."""
    if item.since > CELERY_VERSION:
        return None  # not expected there: the feature is off (see the flags below)
    missing = object()
    target = inspect.getattr_static(item.owner, item.name, missing)
    if target is missing:
        return (f"Celery {celery.__version__} has no {item.where}: {item.purpose} no longer "
                "works with it")
    if item.parameters is not None:
        try:
            found = _parameters(getattr(item.owner, item.name))
        except (TypeError, ValueError):  # not introspectable: a builtin or not callable
            return f"{item.where} in Celery {celery.__version__} is not a Python function"
        if (found if item.exact else found[:len(item.parameters)]) != item.parameters:
            return (f"{item.where} changed its parameters in Celery {celery.__version__}: "
                    f"expected ({', '.join(item.parameters)}), found ({', '.join(found)}); "
                    f"{item.purpose} may no longer work with it")
    return None


def surface_problems() -> list[str]:
    """Every private or overridden Celery name that the installed Celery does not provide as
    expected (empty when all is well)."""
    return [problem for item in (*PRIVATE_SURFACE, *OVERRIDDEN_PUBLIC)
            if (problem := problem_with(item)) is not None]


#: Celery >= 5.5: ``Task.push_request`` keeps the current request's fields, so the body of a
#: task with its own ``__call__`` (IdempotentTask) sees its id, headers and retries. Celery 5.4
#: pushes a bare request there; IdempotentTask.push_request makes up for it.
PUSH_REQUEST_KEEPS_REQUEST: bool = CELERY_VERSION >= (5, 5)

#: Celery >= 5.7: ``Request._retry_worker_lost`` (``task_retry_on_worker_lost``) exists.
RETRIES_ON_WORKER_LOST: bool = hasattr(Request, "_retry_worker_lost")


def dump_pydantic_arguments(task: Any, args: Any, kwargs: Any,
                            options: dict[str, Any]) -> tuple[Any, Any]:
    """The arguments as Celery's own ``apply_async`` sends them: for a ``pydantic=True`` task
    on Celery >= 5.7, its models dumped (unless the message is pickled); unchanged otherwise
    (older Celery releases convert nothing at publish)."""
    dump = getattr(task, "_dump_pydantic_arguments", None)
    if dump is None or options.get("serializer") == "pickle":
        return args, kwargs
    dumped: tuple[Any, Any] = dump(args, kwargs)
    return dumped


def apply_group_tasks(members: Any, tasks: list[Any], producer: Any, app: Any, barrier: Any,
                      **options: Any) -> list[Any]:
    """Celery's own ``group._apply_tasks`` for ``members`` (a group): send each prepared
    ``(signature, frozen result, group id)`` of ``tasks`` in order, and their results."""
    return list(group._apply_tasks(members, tasks, producer, app, barrier, **options))


def revoked_or_cancelled(request: Any) -> bool:
    """Whether Celery already handled this request as revoked or cancelled (its failure that
    follows is not a lost child)."""
    return bool(getattr(request, "_already_revoked", False)
                or getattr(request, "_already_cancelled", False))


def current_worker_task() -> Any:
    """The task running in this worker thread, or None (``celery._state``)."""
    return _state.get_current_worker_task()


def task_meta(result: AsyncResult) -> dict[str, Any]:
    """What an `AsyncResult` reports (state, result, ...), as its public properties read it."""
    meta: dict[str, Any] = result._get_task_meta()
    return meta


for _problem in surface_problems():
    warnings.warn(f"celery-idempotency: {_problem} (tested with Celery 5.4 to 5.7)",
                  RuntimeWarning, stacklevel=2)
