"""Redis error replies with real workers: a "not now" reply is an unavailable store (the claim
or outcome write waits and lands later, nothing runs twice, nothing is lost); a "never" reply
is a clear error that neither runs the task unprotected nor spins.

The store is a redis-server of the test's own (``own_redis``), into which each test injects
the reply the way production meets it (CONFIG SET, ACLs, a foreign value under a record's
name); broker and effects stay on the session server.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_idempotency import (
    CorruptRecord,
    KeyState,
    RecordRef,
    StoreMisconfigured,
    StoreUnavailable,
)
from celery_idempotency.records import F_STATE, state_code
from tests.integration import app as itest
from tests.integration.app import charge, long_lease, six_second_lease, slow
from tests.support.integration import (
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    log_lines,
    new_order_id,
    redis_stack,
    task_log,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

STORE_DB = 13  # tests.support.integration.STORE_DB, on the test's own server
PREFIX = "idem:"


@pytest.fixture
def worker(outage_stack: Stack, tmp_path: Path) -> Iterator[Worker]:
    """The test's own worker, on the outage stack (the store on ``own_redis``)."""
    running = outage_stack.worker(tmp_path).start()
    yield running
    running.stop()


def record_name(task_name: str, key: str) -> str:
    return RecordRef(task_name, key).store_key(PREFIX)


def test_noreplicas_at_the_outcome_write_waits_and_lands_when_cleared(
        own_redis: RedisServer, worker: Worker, effects: Effects,
        published: PublishLog) -> None:
    """min-replicas-to-write set while the task runs: the success write is refused with
    NOREPLICAS, retried as for an unreachable store, and lands once the setting is cleared;
    the record ends ``succeeded`` and a client's retry does not run the side effect again."""
    job, key = unique("noreplicas"), unique("noreplicas-key")
    admin = own_redis.client()
    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    wait_for(lambda: effects.count("long_lease", job) == 1, what="the task to start",
             worker=worker)
    admin.config_set("min-replicas-to-write", 1)
    try:
        wait_for(lambda: log_lines(worker, "trying to record success"),
                 what="the refused outcome write", worker=worker)
        time.sleep(1.0)  # several refused attempts
        record = handle.record()
        assert record is not None and record.state is KeyState.STARTED
        assert not task_log(worker, handle.id, "succeeded"), "acknowledged before it landed"
        assert "NOREPLICAS" in worker.output()
    finally:
        admin.config_set("min-replicas-to-write", 0)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1
    record = handle.record()
    assert record is not None and record.state is KeyState.SUCCEEDED
    retry = long_lease.apply_async((job, 1.5), idempotency_key=key)
    assert retry.duplicate and retry.get(timeout=TIMEOUT) == result
    time.sleep(1.0)
    assert effects.count("long_lease", job) == 1
    assert published.ids_for(key) == [handle.id]
    assert "Exception in thread" not in worker.output()


def test_a_claim_refused_with_oom_is_not_run_and_not_lost(
        own_redis: RedisServer, worker: Worker, effects: Effects) -> None:
    """A message sent by name (its claim creates the record) while the store is out of memory
    (maxmemory, noeviction): not run, not acknowledged as done; it runs once when memory is
    freed."""
    order, key = new_order_id(), unique("oom")
    admin = own_redis.client(STORE_DB)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        sent = itest.app.send_task(charge.name, args=(order,),
                                   headers={"idempotency_key": key})
        wait_for(lambda: len(log_lines(worker, f"charge[{sent.id}] key={key!r} not run")) >= 2,
                 what="the claim to be refused twice", worker=worker)
        assert "OOM command not allowed" in worker.output()
        assert effects.count("charge", order) == 0
        assert not task_log(worker, sent.id, "raised")
        assert admin.exists(record_name(charge.name, key)) == 0
    finally:
        admin.config_set("maxmemory", 0)
    wait_for(lambda: task_log(worker, sent.id, "succeeded"), what="the task to run",
             worker=worker)
    time.sleep(1.5)  # longer than the retry backoff: a second run would show by now
    assert effects.count("charge", order) == 1
    assert len(task_log(worker, sent.id, "succeeded")) == 1
    assert admin.hget(record_name(charge.name, key), F_STATE) == \
        state_code(KeyState.SUCCEEDED).encode()


def test_the_lease_keeper_survives_refused_renewals_and_keeps_renewing(
        own_redis: RedisServer, worker: Worker, effects: Effects) -> None:
    """Renewals refused with NOREPLICAS (a raw ResponseError used to kill the keeper thread):
    the keeper logs, carries on, and renews again once the store accepts writes."""
    job, key = unique("keeper"), unique("keeper-key")
    admin = own_redis.client(STORE_DB)
    handle = slow.apply_async((job, 6.0), idempotency_key=key)  # lease 1.5 s, renewed
    name = record_name(slow.name, key)
    wait_for(lambda: effects.count("slow", job) == 1, what="the task to start", worker=worker)
    admin.config_set("min-replicas-to-write", 1)
    try:
        wait_for(lambda: log_lines(worker, "could not renew the lease"),
                 what="a refused renewal", worker=worker)
        time.sleep(0.6)
    finally:
        admin.config_set("min-replicas-to-write", 0)
    first = int(admin.hget(name, "l") or 0)
    wait_for(lambda: int(admin.hget(name, "l") or 0) > first, what="a renewal after the fault",
             worker=worker)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 1
    assert effects.count("slow", job) == 1
    assert "Exception in thread" not in worker.output()
    assert "NOREPLICAS" in worker.output()


def test_a_corrupt_record_at_claim_fails_the_task_without_running_it(
        own_redis: RedisServer, worker: Worker, effects: Effects) -> None:
    """A foreign value under the record's name: the task is not run (that could run it
    twice), it fails with CorruptRecord naming the Redis key, and the value is left alone."""
    order, key = new_order_id(), unique("corrupt")
    admin = own_redis.client(STORE_DB)
    name = record_name(charge.name, key)
    admin.set(name, "not a record")
    sent = itest.app.send_task(charge.name, args=(order,), headers={"idempotency_key": key})
    raised = wait_for(lambda: task_log(worker, sent.id, "raised"), what="the task to fail",
                      worker=worker)
    assert "CorruptRecord" in raised[0] and name in raised[0]
    time.sleep(1.0)
    assert effects.count("charge", order) == 0
    assert admin.get(name) == b"not a record"


def test_a_permanent_error_at_the_outcome_write_is_reported_at_once(
        own_redis: RedisServer, worker: Worker, effects: Effects) -> None:
    """The record is replaced by a foreign value while the task runs: the success write meets
    WRONGTYPE, is reported once, and the task's own result still goes to Celery (no 300 s
    of retries: idempotency_store_write_timeout is for an unavailable store)."""
    job, key = unique("late-corrupt"), unique("late-corrupt-key")
    admin = own_redis.client(STORE_DB)
    handle = long_lease.apply_async((job, 1.5), idempotency_key=key)
    wait_for(lambda: effects.count("long_lease", job) == 1, what="the task to start",
             worker=worker)
    admin.delete(record_name(long_lease.name, key))
    admin.set(record_name(long_lease.name, key), "overwritten")
    wait_for(lambda: task_log(worker, handle.id, "succeeded"), what="the task to finish",
             timeout=15, worker=worker)
    reported = log_lines(worker, "could not record success")
    assert len(reported) == 1 and "WRONGTYPE" in reported[0].message
    assert not log_lines(worker, "trying to record success")


def test_an_acl_refusal_at_claim_keeps_the_message_until_it_is_fixed(
        redis_server: RedisServer, own_redis: RedisServer, tmp_path: Path,
        effects: Effects) -> None:
    """The worker's Redis user may not run EVALSHA: StoreMisconfigured. The task is not run,
    the error names what to change, and the message comes back (with backoff) until the ACL
    is fixed; then it runs once."""
    admin = own_redis.client()
    admin.acl_setuser("worker", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-evalsha", "-eval", "-script"])
    stack = redis_stack(redis_server, idempotency_store_retry_max_delay=1.0,
                        idempotency_store_timeout=0.5)
    stack = Stack(stack.broker_url, f"redis://worker:pw@127.0.0.1:{own_redis.port}/{STORE_DB}",
                  stack.effects_url, stack.queue, stack.extra_conf)
    use_stack(itest.app, stack)
    order, key = new_order_id(), unique("noperm")
    acl_worker = stack.worker(tmp_path).start()
    try:
        sent = itest.app.send_task(charge.name, args=(order,), headers={"idempotency_key": key})
        refused = wait_for(lambda: [line for line in log_lines(acl_worker, "misconfigured")
                                    if line.level == "ERROR"],
                           what="the claim to be refused", worker=acl_worker)
        assert "NOPERM" in refused[0].message and "EVALSHA" in refused[0].message
        assert "pw@" not in acl_worker.output()
        time.sleep(1.0)
        assert effects.count("charge", order) == 0
        admin.acl_setuser("worker", commands=["+evalsha", "+script"])
        wait_for(lambda: task_log(acl_worker, sent.id, "succeeded"), what="the task to run",
                 worker=acl_worker)
        time.sleep(1.5)
        assert effects.count("charge", order) == 1
    finally:
        acl_worker.stop()


def test_publish_fails_closed_on_a_not_now_reply_and_names_a_corrupt_record(
        own_redis: RedisServer, outage_stack: Stack, published: PublishLog) -> None:
    """At publish: NOREPLICAS raises StoreUnavailable (the client tries again) and a foreign
    value under the record's name raises CorruptRecord naming it; nothing is sent."""
    order, key = new_order_id(), unique("publish-noreplicas")
    admin = own_redis.client(STORE_DB)
    admin.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(StoreUnavailable, match="NOREPLICAS") as info:
            charge.apply_async((order,), idempotency_key=key)
        assert info.value.key == key
    finally:
        admin.config_set("min-replicas-to-write", 0)
    assert published.ids_for(key) == []
    assert charge.apply_async((order,), idempotency_key=key).duplicate is False  # back

    corrupt_key = unique("publish-corrupt")
    name = record_name(charge.name, corrupt_key)
    admin.rpush(name, "not", "a", "record")
    with pytest.raises(CorruptRecord) as corrupt:
        charge.apply_async((order,), idempotency_key=corrupt_key)
    assert corrupt.value.key == name and "WRONGTYPE" in str(corrupt.value)
    assert published.ids_for(corrupt_key) == []


def test_the_main_process_survives_a_refused_abandon(
        own_redis: RedisServer, worker: Worker, effects: Effects) -> None:
    """A pool child is killed while the store refuses writes (NOREPLICAS): the main process
    cannot give the claim up, says so, and goes on; the requeued message is not run while the
    store refuses, and runs once the claim's lease has run out (the first run was killed in
    its body: the window, a second run is expected)."""
    job, key = unique("abandon"), unique("abandon-key")
    admin = own_redis.client(STORE_DB)
    handle = six_second_lease.apply_async((job, 3.0), idempotency_key=key)
    wait_for(lambda: effects.count("six_second_lease", job) == 1, what="the task to start",
             worker=worker)
    child = effects.values("six_second_lease", job)[0]["pid"]
    admin.config_set("min-replicas-to-write", 1)
    try:
        os.kill(child, signal.SIGKILL)
        refused = wait_for(lambda: log_lines(worker, "could not give up its claim"),
                           what="the refused abandon", worker=worker)
        assert "NOREPLICAS" in refused[0].message and refused[0].process == "MainProcess"
        wait_for(lambda: log_lines(worker, f"key={key!r} not run"),
                 what="the redelivery to be refused", worker=worker)
        assert effects.count("six_second_lease", job) == 1
    finally:
        admin.config_set("min-replicas-to-write", 0)
    result = handle.get(timeout=TIMEOUT)
    assert result["run"] == 2
    assert worker.process is not None and worker.process.poll() is None
    assert "celery_idempotency/" not in worker.output()  # no traceback through the library
    time.sleep(1.0)
    assert effects.count("six_second_lease", job) == 2


def test_fail_open_covers_not_now_replies_but_not_a_store_that_refuses_for_good(
        redis_server: RedisServer, own_redis: RedisServer, published: PublishLog,
        caplog: pytest.LogCaptureFixture) -> None:
    """idempotency_on_store_error='fail_open': a NOREPLICAS at publish publishes anyway (with a
    warning), as for an unreachable store; an ACL refusal is still raised: a misconfigured
    store is a mistake to fix, not an outage to ride out."""
    admin = own_redis.client()
    admin.acl_setuser("nokeys", enabled=True, passwords=["+pw"], keys=["other:*"],
                      commands=["+@all"])
    base = redis_stack(redis_server, idempotency_on_store_error="fail_open")
    order = new_order_id()

    use_stack(itest.app, Stack(base.broker_url, own_redis.url(STORE_DB), base.effects_url,
                               base.queue, base.extra_conf))
    key = unique("fail-open-noreplicas")
    admin.config_set("min-replicas-to-write", 1)
    try:
        sent = charge.apply_async((order,), idempotency_key=key)
    finally:
        admin.config_set("min-replicas-to-write", 0)
    assert published.ids_for(key) == [sent.id]
    assert "UNPROTECTED" in caplog.text

    use_stack(itest.app, Stack(
        base.broker_url, f"redis://nokeys:pw@127.0.0.1:{own_redis.port}/{STORE_DB}",
        base.effects_url, base.queue, base.extra_conf))
    refused = unique("fail-open-noperm")
    with pytest.raises(StoreMisconfigured, match="NOPERM"):
        charge.apply_async((order,), idempotency_key=refused)
    assert published.ids_for(refused) == []
