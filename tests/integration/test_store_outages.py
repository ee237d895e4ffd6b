"""The key store goes down or restarts: fail closed, lose nothing.

The store is a redis-server of the test's own (``own_redis``, the ``outage_stack``) that the
test stops and restarts, with or without its data, at publish, before execution or while a
task runs; the broker and the effects db stay up on the session server. Each test starts its
own worker, at the moment the scenario needs it. (Error replies from a store that is up are in
test_store_error_replies.py.)

Measured times are printed as ``[measured] ...`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_idempotency import KeyState, StoreUnavailable
from tests.integration import app as itest
from tests.integration.app import charge, long_lease
from tests.support.integration import (
    BROKER_DB,
    TIMEOUT,
    Effects,
    Fleet,
    PublishLog,
    Stack,
    log_lines,
    new_order_id,
    redis_queue_length,
    redis_stack,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.runs import (
    SETTLE,
    done_of,
    measured,
    record_of,
    runs_of,
    wait_for_expired_lease,
    wait_for_runs,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

# -- down at publish, down before execution ----------------------------------------------------


@pytest.fixture
def late_worker(outage_stack: Stack, tmp_path: Path) -> Iterator[Worker]:
    """A worker for the failing stack, not started: the test starts it when it wants."""
    worker = outage_stack.worker(tmp_path)
    yield worker
    worker.stop()


def test_store_down_at_publish_raises_and_publishes_nothing(
        redis_server: RedisServer, own_redis: RedisServer, outage_stack: Stack,
        late_worker: Worker, effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("down-at-publish")
    broker = redis_server.client(BROKER_DB)

    own_redis.stop()
    with pytest.raises(StoreUnavailable) as error:
        charge.apply_async((order,), idempotency_key=key)
    assert error.value.key == key
    assert published.ids_for(key) == []
    assert redis_queue_length(broker, outage_stack.queue) == 0

    own_redis.start()
    assert charge.result_for_key(key) is None, "a failed publish leaves no reservation"

    # Control: with the store back, the same publish goes out (one message) and runs once.
    handle = charge.apply_async((order,), idempotency_key=key)
    assert handle.duplicate is False
    assert redis_queue_length(broker, outage_stack.queue) == 1
    late_worker.start()
    assert handle.get(timeout=TIMEOUT) == {"order_id": order, "amount": 100, "run": 1,
                                           "task_id": handle.id}
    time.sleep(0.5)
    assert effects.count("charge", order) == 1
    assert published.ids_for(key) == [handle.id]
    assert len(task_log(late_worker, handle.id, "received")) == 1
    assert len(re.findall(r"Task \S+ received", late_worker.output())) == 1


def test_store_down_at_execution_fails_closed_and_runs_once_when_back(
        own_redis: RedisServer, outage_stack: Stack, late_worker: Worker,
        effects: Effects, published: PublishLog) -> None:
    order, key = new_order_id(), unique("down-at-execution")

    # Published (and reserved) while the store is up, then the store goes down, keeping its
    # data on disk, before any worker has seen the message.
    handle = charge.apply_async((order,), idempotency_key=key)
    assert handle.duplicate is False
    own_redis.stop(save=True)

    late_worker.start()
    wait_for(lambda: "idempotency store unreachable" in late_worker.output(),
             what="the worker to report the store unreachable", worker=late_worker)
    time.sleep(2.0)  # several attempts, none of which may run the task unprotected
    assert effects.count("charge", order) == 0
    log = late_worker.output()
    assert f"charge[{handle.id}] key={key!r} not run" in log
    assert f"charge[{handle.id}] succeeded" not in log

    own_redis.start(keep_data=True)
    assert handle.record() is not None, "the reservation survived the store's restart"
    assert handle.get(timeout=TIMEOUT) == {"order_id": order, "amount": 100, "run": 1,
                                           "task_id": handle.id}
    time.sleep(1.5)  # longer than the retry backoff: a second run would show by now
    assert effects.count("charge", order) == 1
    assert len(task_log(late_worker, handle.id, "succeeded")) == 1
    assert published.ids_for(key) == [handle.id]


# -- restarted or down while a task runs -------------------------------------------------------


def test_store_restarted_with_data_at_completion_the_retried_write_lands(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The store goes down (saving its data) while the task runs and comes back just after the
    body returned: the outcome write, retried while the store is unreachable, lands after
    the restart."""
    worker = fleet.start(outage_stack)
    effects = Effects(outage_stack.effects())
    job, key = unique("restart-data"), unique("restart-data-key")

    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    done = wait_for(lambda: done_of(effects, "long_lease", job), what="the body to return",
                    worker=worker)[0]
    time.sleep(0.3)  # let the outage span a few write attempts
    back_at = time.time()
    own_redis.start(keep_data=True)

    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1 and result["fence"] == first["fence"]
    succeeded = wait_for(lambda: log_lines(worker, f"[{handle.id}] succeeded"),
                         what="Celery's success line", worker=worker)
    assert done["at"] < back_at <= succeeded[0].at + 0.001, \
        "the body returned during the outage; the outcome was written after the restart"
    time.sleep(SETTLE)
    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (handle.id, first["fence"])
    assert effects.count("long_lease", job) == 1
    assert "could not record success" not in worker.output()
    effects.client.close()
    measured("7a: body returned -> outcome written (store restarted)",
             succeeded[0].at - done["at"])


def test_store_restarted_empty_refuses_the_completion_and_the_key_runs_again(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The documented data-loss window: the store loses its data while a task runs. The
    completion finds no record and writes nothing (OwnershipLost, logged); the key is unknown,
    so a later publish runs the task again."""
    worker = fleet.start(outage_stack)
    effects = Effects(outage_stack.effects())
    job, key = unique("restart-empty"), unique("restart-empty-key")

    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    first = wait_for_runs(effects, "long_lease", job, 1, worker)[0]
    own_redis.restart(keep_data=False)
    assert record_of(long_lease, key) is None

    refused = wait_for(lambda: log_lines(worker, "lost the claim"),
                       what="the completion to be refused", worker=worker)
    assert refused[0].level == "ERROR" and f"[{handle.id}]" in refused[0].message
    assert "the record is gone" in refused[0].message
    assert record_of(long_lease, key) is None, "nothing written into the empty store"

    again = long_lease.apply_async((job, 1.5), idempotency_key=key)
    assert again.duplicate is False and again.id != handle.id
    result = again.get(timeout=TIMEOUT)
    # A new record (the store lost everything), yet its first fence is above the lost one.
    assert result["run"] == 2 and result["fence"] > first["fence"]
    assert handle.get(timeout=TIMEOUT) == result
    time.sleep(SETTLE)
    assert effects.count("long_lease", job) == 2
    final = record_of(long_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert final.task_id == again.id
    effects.client.close()


def test_store_down_for_seconds_at_completion_the_write_waits_and_lands(
        own_redis: RedisServer, outage_stack: Stack, fleet: Fleet) -> None:
    """The store is down for 4 s (longer than its 0.5 s timeout and any single retry) when the
    task returns: the outcome write keeps trying (idempotency_store_write_timeout, 300 s by
    default) and lands once the store is back; the handle gets the result, nothing re-runs."""
    from tests.integration.app import six_second_lease

    worker = fleet.start(outage_stack)
    effects = Effects(outage_stack.effects())
    job, key = unique("wait"), unique("wait-key")
    handle = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    first = wait_for_runs(effects, "six_second_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    wait_for(lambda: log_lines(worker, "store unreachable, trying to record success"),
             what="the write to wait for the store", worker=worker)
    time.sleep(4)
    own_redis.start(keep_data=True)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1 and result["fence"] == first["fence"]
    record = record_of(six_second_lease, key)
    assert record is not None
    assert (record.state, record.fence) == (KeyState.SUCCEEDED, first["fence"])
    assert six_second_lease.apply_async((job, 0.5), idempotency_key=key).duplicate
    time.sleep(SETTLE)
    assert effects.count("six_second_lease", job) == 1
    assert not log_lines(worker, "could not record success")
    effects.client.close()


@pytest.fixture
def short_write_stack(redis_server: RedisServer, own_redis: RedisServer,
                      app_conf: None) -> Stack:
    made = redis_stack(redis_server, store=own_redis, idempotency_store_timeout=0.5,
                       idempotency_store_retry_max_delay=1.0,
                       idempotency_store_write_timeout=1.5)
    use_stack(itest.app, made)
    return made


def test_store_down_past_the_write_timeout_keeps_the_claim_until_its_lease_expires(
        own_redis: RedisServer, short_write_stack: Stack, fleet: Fleet,
        published: PublishLog) -> None:
    """The store is down for longer than the outcome-write timeout (1.5 s here): the worker
    logs an ERROR and the claim stays ``started`` (a publish meanwhile is a duplicate) until
    its lease (6 s) expires; then a publish goes out and takes over with a higher fence."""
    from tests.integration.app import six_second_lease

    outage_stack = short_write_stack
    worker = fleet.start(outage_stack)
    effects = Effects(outage_stack.effects())
    job, key = unique("down"), unique("down-key")
    store = six_second_lease.idem_store()

    handle = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    first = wait_for_runs(effects, "six_second_lease", job, 1, worker)[0]
    own_redis.stop(save=True)
    done = wait_for(lambda: done_of(effects, "six_second_lease", job), what="the body to return",
                    worker=worker)[0]
    gave_up = wait_for(lambda: log_lines(worker, "could not record success, store unreachable"),
                       what="the write to be given up", worker=worker)
    assert gave_up[0].level == "ERROR" and "the claim stays until its lease expires" in \
        gave_up[0].message
    own_redis.start(keep_data=True)
    back_at = time.time()

    stuck = record_of(six_second_lease, key)
    assert stuck is not None and stuck.state is KeyState.STARTED
    assert (stuck.task_id, stuck.fence) == (handle.id, first["fence"])
    assert stuck.lease_expires_ms is not None
    left_ms = stuck.lease_expires_ms - store.now_ms()
    assert left_ms > 0, f"the lease must still be alive after the restart ({left_ms} ms)"
    probe = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    assert (probe.id, probe.duplicate) == (handle.id, True)

    wait_for_expired_lease(six_second_lease, key)
    expired_at = time.time()
    takeover = six_second_lease.apply_async((job, 0.5), idempotency_key=key)
    assert takeover.duplicate is False and takeover.id != handle.id
    result = takeover.get(timeout=TIMEOUT)
    second = runs_of(effects, "six_second_lease", job)[1]
    assert result == {"job": job, "run": 2, "fence": second["fence"], "pid": second["pid"]}
    assert second["fence"] > first["fence"]
    assert f"[{takeover.id}] key={key!r}: the lease of task {handle.id} expired; taken over " \
           f"(fence {second['fence']})" in worker.output()
    assert handle.get(timeout=TIMEOUT) == result
    time.sleep(SETTLE)
    assert effects.count("six_second_lease", job) == 2
    final = record_of(six_second_lease, key)
    assert final is not None and final.state is KeyState.SUCCEEDED
    assert (final.task_id, final.fence) == (takeover.id, second["fence"])
    assert published.ids_for(key) == [handle.id, takeover.id]
    effects.client.close()

    measured("7c: body returned -> write given up (ERROR)", gave_up[0].at - done["at"])
    measured("7c: store back -> lease expired", expired_at - back_at)
    measured("7c: lease left when the store came back", left_ms / 1000)
    measured("7c: body returned -> takeover run starts", second["started"] - done["at"])
