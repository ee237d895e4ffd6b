"""Refuse, when a worker starts, a memory store that the worker's pool would split in pieces.

The memory store (``memory://``) keeps its records in the memory of one process. A prefork
pool runs tasks in child processes, each with its own copy that starts empty (and starts empty
again when a child is replaced), and gives up the claims of lost children in the main process,
in yet another copy: two messages with one key run twice, and nothing says so. A worker whose
pool may run tasks in more than one process is therefore refused before it takes a message.

The check is a worker bootstep that every app with an `IdempotentTask` gets when the task is
bound to it (no call needed from the user). A bootstep rather than a signal receiver: Celery
logs and swallows what a signal receiver raises, while a bootstep's error stops the worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.concurrency import ALIASES  # names of the pools, importing none of them

from .exceptions import ConfigurationError, IdempotencyError

logger = logging.getLogger("celery_idempotency")

#: Pools that run every task in the worker's own process (threads or greenlets).
SINGLE_PROCESS_POOLS = frozenset({
    "celery.concurrency.solo:TaskPool",
    "celery.concurrency.thread:TaskPool",
    "celery.concurrency.gevent:TaskPool",
    "celery.concurrency.eventlet:TaskPool",
})


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def pool_path(pool: Any) -> str:
    """``module:Class`` of a worker's pool, given as a class or a name (``-P`` alias)."""
    if isinstance(pool, type):
        return _class_path(pool)
    name = str(pool or "prefork")
    return str(ALIASES.get(name, name))


def pool_name(pool: Any) -> str:
    """The pool as ``-P`` names it (``prefork``), else its ``module:Class``."""
    path = pool_path(pool)
    return next((alias for alias, target in ALIASES.items() if target == path
                 and alias != "processes"), path)


def runs_in_one_process(pool: Any) -> bool:
    """True when ``pool`` runs tasks in the worker's own process. A subclass of one of those
    pools counts as one; an unknown pool (``-P custom``) does not."""
    if isinstance(pool, type):
        return any(_class_path(klass) in SINGLE_PROCESS_POOLS for klass in pool.__mro__)
    return pool_path(pool) in SINGLE_PROCESS_POOLS


def memory_store_tasks(app: Any) -> list[str]:
    """Names of the app's enabled idempotent tasks whose store is ``memory://``."""
    names = []
    for name, task in sorted(app.tasks.items()):
        config_of = getattr(task, "idem_config", None)
        if config_of is None:
            continue
        try:
            config = config_of()
        except IdempotencyError:  # misconfigured: the task reports that itself when used
            continue
        if config.enabled and config.store_url.split("://", 1)[0].lower() == "memory":
            names.append(name)
    return names


def check_worker(worker: Any) -> None:
    """Raise `ConfigurationError` if ``worker``'s pool would split a memory store."""
    pool = getattr(worker, "pool_cls", None)
    if runs_in_one_process(pool):
        return
    tasks = memory_store_tasks(worker.app)
    if not tasks:
        return
    shown = ", ".join(tasks[:5]) + (f" and {len(tasks) - 5} more" if len(tasks) > 5 else "")
    message = (
        f"idempotency_store_url='memory://' (task(s) {shown}) cannot be used with the worker "
        f"pool {pool_name(pool)!r}: the memory store lives in one process, and this pool runs "
        "tasks in child processes, each with its own empty copy (the main process, which gives "
        "up the claims of lost children, has another), so a key would run once per process. "
        "Use a Redis store (idempotency_store_url='redis://...'), or a single-process pool "
        "(-P solo, -P threads, -P gevent, -P eventlet)")
    logger.critical("%s", message)
    raise ConfigurationError(message)


class MemoryStoreCheck(bootsteps.Step):  # type: ignore[misc]
    """Worker bootstep: `check_worker` while the worker is being built, before it connects to
    the broker or starts its pool."""

    label = "idempotency memory store check"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        check_worker(parent)


def register(app: Any) -> None:
    """Give ``app``'s workers the check (a set: registering twice adds it once)."""
    app.steps["worker"].add(MemoryStoreCheck)
