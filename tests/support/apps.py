"""The Celery apps of the tests, the chaos suite and the benchmarks: the one way they
re-target the publishing app in their own process at a new stack (broker, queue, key store),
the one way their tasks reach the effects database, and the unit tests' eager app and
store that is down."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery
from kombu import pools

from celery_idempotency import IdempotentTask
from tests.support.services import free_port

_ABSENT = object()


def eager_app(main: str, *, propagate: bool = False, **settings: Any) -> Celery:
    """An app that runs its tasks in the calling process (``task_always_eager``) on the memory
    store: `IdempotentTask` without a broker or a worker. ``propagate`` is
    ``task_eager_propagates`` (``apply()`` raises the task's exception); ``settings`` are
    added to or override the app's configuration."""
    app = Celery(main, set_as_current=False)
    app.conf.update({"task_always_eager": True, "idempotency_store_url": "memory://", **settings})
    if propagate:
        app.conf.task_eager_propagates = True
    return app


def worker_app(main: str, *, redelivering: bool = False, **settings: Any) -> Celery:
    """The app of a test worker's task module, pointed by the environment the test starts the
    worker with: ``BROKER_URL``, ``STORE_URL``, ``QUEUE``. ``redelivering``: a killed worker's
    late-acked messages come back within about a second (kombu's Redis transport restores
    unacked messages; its defaults wait minutes), as the crash-safety tests need."""
    app = Celery(main, broker=os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/15"))
    transport: dict[str, Any] = {"visibility_timeout": 30, "polling_interval": 0.1}
    if redelivering:
        transport.update(unacked_restore_interval=1, unacked_restore_throttle=1,
                         unacked_mutex_expire=10)
        settings = {"task_reject_on_worker_lost": True, **settings}
    app.conf.update(
        idempotency_store_url=os.environ.get("STORE_URL", "memory://"),
        task_default_queue=os.environ.get("QUEUE", "celery"),
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        **settings,
    )
    return app


def store_down(app: Celery, **settings: Any) -> None:
    """Point ``app`` at a key store that is down (a free 127.0.0.1 port: nothing listens), with
    a short timeout so that the refusal comes at once; ``settings`` are added (for example
    ``idempotency_on_store_error="fail_open"``)."""
    app.conf.update({"idempotency_store_url": f"redis://127.0.0.1:{free_port()}/0",
                     "idempotency_store_timeout": 0.2, **settings})


def forget_idempotency_settings(app: Celery) -> None:
    """Make every `IdempotentTask` of ``app`` resolve its idempotency settings again (after
    ``app.conf`` changed)."""
    for task in app.tasks.values():
        if isinstance(task, IdempotentTask):
            task.reset_idem_config()


def point_app_at(app: Celery, **settings: Any) -> None:
    """Apply ``settings`` to ``app`` and forget what was built from the old ones: the broker
    connection pools, queue declarations and router (built on first use and cached) and the
    tasks' resolved idempotency settings, so that the next publish goes to the new stack.

    A setting an earlier call set and this one does not goes back to the app's own value: one
    test's stack (``idempotency_on_store_error="fail_open"``, say) must not leak into the next
    test's."""
    originals: dict[str, Any] = app.__dict__.setdefault("_settings_before_stacks", {})
    for name in settings:
        originals.setdefault(name, app.conf.get(name, _ABSENT))
    for name, original in originals.items():
        if name in settings:
            continue
        if original is _ABSENT:
            app.conf.changes.pop(name, None)
        else:
            app.conf[name] = original
    app.conf.update(**settings)
    app._pool = None
    app.__dict__.pop("amqp", None)
    pools.reset()
    forget_idempotency_settings(app)


class RedisFromEnv:
    """``client = RedisFromEnv("EFFECTS_URL")``: ``client()`` is one Redis client per process,
    made on first use from the URL in that environment variable (a worker's pool child makes
    its own after the fork); `reset` forgets it (the variable changed)."""

    def __init__(self, variable: str) -> None:
        self.variable = variable
        self._client: redis.Redis | None = None
        self._pid = 0

    def __call__(self) -> redis.Redis:
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(os.environ[self.variable])
            self._pid = os.getpid()
        return self._client

    def reset(self) -> None:
        self._client = None
