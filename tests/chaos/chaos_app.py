"""The Celery app of the chaos suite: one idempotent task of three recovery points (steps)
that records every execution and every call of a step's function.

Configured from the environment, so that the test process, the second publisher process and
every worker agree: CHAOS_BROKER_URL, CHAOS_STORE_URL, CHAOS_EFFECTS_URL (a Redis db that is
never restarted, where executions are recorded) and CHAOS_QUEUE (the run's own queue).

What a run records in the effects db, per key ``K``:

- ``effect:K``  the side effect: INCR once per execution of the task body;
- ``runs:K``    one JSON entry per execution, written in the same MULTI as the INCR: execution
                id, pid, process group, wall-clock start, how long the body sleeps, task id,
                fencing counter;
- ``done:K``    one JSON entry (execution id, wall-clock time) per execution whose
                ``IdempotentTask.__call__`` returned, i.e. after its completion write to the
                key store was made (or refused, which then shows up as a second execution
                that no kill explains);
- ``ended:K``   one JSON entry (execution id, wall-clock time, exception class) per execution
                that ended with an exception instead: a step that found the store unreachable
                ends it like a retry (``Retry``), and the message comes back later;
- ``running``   pid -> execution id while a body runs (the chaos controller kills busy pool
                children and busy workers with it);
- ``steps:K``   one JSON entry per call of a step's function (``self.step`` did not find the
                step recorded): step name, step-run id, execution id, pid, process group,
                wall-clock start;
- ``stepends:K``  the step-run id once that function's work is done (it returns next, and the
                library records its value);
- ``stepdone:K``  one JSON entry (execution id, step, the step-run id whose value came back)
                each time ``self.step`` returned in an execution: by then the step's value was
                recorded (or it was replayed from its record), so a step run listed here must
                never run again.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import uuid
from typing import Any

from celery import Celery

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, point_app_at

PENDING_TIMEOUT = 5.0


def settings(broker_url: str, store_url: str, queue: str) -> dict[str, Any]:
    """The Celery settings of a chaos run (workers and publishers alike)."""
    conf: dict[str, Any] = dict(
        broker_url=broker_url,
        idempotency_store_url=store_url,
        # A store restart lasts well under a second: look again soon, and never let a
        # countdown come near the Redis broker's visibility timeout (an ETA message held
        # longer than that is restored to the queue while it waits).
        idempotency_store_retry_max_delay=2.0,
        idempotency_store_timeout=1.0,
        # A reservation whose message the broker lost is published again by the next client
        # retry after this long (the default is 10 minutes).
        idempotency_pending_timeout=PENDING_TIMEOUT,
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # The shared RabbitMQ sees other runs: no pidbox queues or exchanges of ours there.
        worker_enable_remote_control=False,
        result_backend=None,
        broker_transport_options={},
    )
    if broker_url.startswith("redis"):
        # The settings: kombu 5.7 restores the unacked messages of a dead worker only
        # on its periodic sweep, once they are older than the visibility timeout.
        conf["broker_transport_options"] = {
            "visibility_timeout": 5, "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1, "unacked_mutex_expire": 10}
    return conf


app = Celery("chaos")
app.conf.update(settings(os.environ.get("CHAOS_BROKER_URL", "memory://"),
                         os.environ.get("CHAOS_STORE_URL", "memory://"),
                         os.environ.get("CHAOS_QUEUE", "celery")))
# Extra settings as JSON, for experiments (the harness passes CHAOS_WORKER_CONF to the workers
# as this).
app.conf.update(json.loads(os.environ.get("CHAOS_EXTRA_CONF") or "{}"))

LEASE = 3.0  # short, so that a key whose worker died with its main process is free soon

# The execution the body of the current task recorded (the body runs under a copy of the
# request, so it cannot hand this back through self.request).
_current = threading.local()


effects = RedisFromEnv("CHAOS_EFFECTS_URL")  # effects(): the effects db's client


def environment(broker_url: str, store_url: str, effects_url: str, queue: str) -> dict[str, str]:
    """What a worker or publisher process needs to join a run."""
    return {"CHAOS_BROKER_URL": broker_url, "CHAOS_STORE_URL": store_url,
            "CHAOS_EFFECTS_URL": effects_url, "CHAOS_QUEUE": queue}


def configure(broker_url: str, store_url: str, effects_url: str, queue: str) -> None:
    """Point this process's app (the test's own publisher) at a run, forgetting the broker
    connections, queue declarations and resolved idempotency settings of an earlier run."""
    os.environ.update(environment(broker_url, store_url, effects_url, queue))
    effects.reset()
    point_app_at(app, **settings(broker_url, store_url, queue))


class ChaosTask(IdempotentTask):
    """Marks an execution done once the library's ``__call__`` has returned: after the
    completion write, the moment after which a kill must not cause a second execution."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _current.execution = None
        try:
            result = super().__call__(*args, **kwargs)
        except BaseException as exc:
            # A step that could not reach the store ends the execution without an outcome
            # (the message comes back later, like a retry): say how it ended.
            self._mark("ended", type(exc).__name__)
            raise
        self._mark("done", None)
        return result

    @staticmethod
    def _mark(what: str, error: str | None) -> None:
        execution, _current.execution = _current.execution, None
        if execution is not None:
            key, exec_id = execution
            pipe = effects().pipeline(transaction=True)
            pipe.rpush(f"{what}:{key}", json.dumps({"exec": exec_id, "t": time.time(),
                                                    "error": error}))
            pipe.hdel("running", os.getpid())
            pipe.execute()


#: The recovery points of `work`, in order (like charging a card, saving the order, sending
#: the receipt).
STEPS = ("charge", "order", "receipt")


def step_effect(key: str, exec_id: str, step: str, sleep: float) -> str:
    """A step's side effect, then its share of the slow work; returns this run's id (the
    step's recorded value)."""
    step_run = uuid.uuid4().hex[:16]
    entry = {"sid": step_run, "step": step, "exec": exec_id, "pid": os.getpid(),
             "pgid": os.getpgid(0), "t": time.time()}
    effects().rpush(f"steps:{key}", json.dumps(entry))
    time.sleep(sleep)
    effects().rpush(f"stepends:{key}", step_run)
    return step_run


@app.task(base=ChaosTask, bind=True, idempotency_lease=LEASE)
def work(self: Any, key: str, sleep_ms: int) -> dict[str, Any]:
    """The execution recorded first, then three steps, each a side effect and a share of a
    short piece of slow work."""
    exec_id = uuid.uuid4().hex[:16]
    pid = os.getpid()
    sleep = sleep_ms / 1000 * random.uniform(0.5, 1.0)
    run = {"exec": exec_id, "pid": pid, "pgid": os.getpgid(0), "t": time.time(),
           "sleep": sleep, "task_id": self.request.id, "fence": self.request.idempotency_fence}
    pipe = effects().pipeline(transaction=True)
    pipe.incr(f"effect:{key}")
    pipe.rpush(f"runs:{key}", json.dumps(run))
    pipe.hset("running", pid, exec_id)
    pipe.execute()
    _current.execution = (key, exec_id)
    done: dict[str, str] = {}
    for step in STEPS:
        done[step] = self.step(step, step_effect, key, exec_id, step, sleep / len(STEPS))
        effects().rpush(f"stepdone:{key}", json.dumps(
            {"exec": exec_id, "step": step, "sid": done[step]}))
    return {"key": key, "exec": exec_id, "task_id": self.request.id, "steps": done}
