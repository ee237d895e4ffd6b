"""Chaos: every key runs once, no recorded step of it runs again, and every caller gets its
one result, while real prefork workers are SIGKILLed (whole process groups and single pool
children) and restarted at random moments and the key store's redis-server is restarted with
its data.

Two brokers: a private redis-server (with the Redis transport's visibility timeout and unacked
restore sweep), and the shared RabbitMQ on a queue of this run's own, deleted afterwards. The
key store is always a private redis-server of its own, so that restarting it loses no broker
message; the effects db (where executions are recorded) is on a server that is never touched.

The store also answers error replies for a while (NOREPLICAS: every write refused, as with
``min-replicas-to-write`` and a lost replica), and in a third run it is a Sentinel-managed
primary and replica (``redis+sentinel://``) failed over while tasks run.

CI runs the short configuration (the defaults in harness.Sizes); `make chaos` the long one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import SUMMARIES, ChaosRun, Report, Sizes
from tests.chaos.stores import SentinelStore
from tests.support.integration import unique
from tests.support.services import (
    RABBITMQ_URL,
    RedisServer,
    ServiceMissing,
    delete_amqp_queue,
    rabbitmq_available,
)

MIN_DUPLICATE_SHARE = 0.3


@pytest.fixture
def sizes() -> Sizes:
    return Sizes.from_env()


@pytest.fixture
def effects_server() -> Iterator[RedisServer]:
    """Never restarted: the Redis broker (db 0) and the effects db (db 1)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def store_server(own_redis: RedisServer) -> RedisServer:
    """The key store: restarted with its data during the run."""
    return own_redis


def publish_report(run: ChaosRun, report: Report) -> None:
    line = report.summary()
    SUMMARIES.append(line)
    SUMMARIES.append(f"    details: {run.log_dir / 'chaos-report.txt'}")
    print(line)
    path = os.environ.get("CHAOS_SUMMARY_FILE")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def check(run: ChaosRun, report: Report) -> None:
    publish_report(run, report)
    sizes = report.sizes
    assert len(report.kills) == sizes.kills
    assert report.worker_restarts == sum(k.kind == "group" for k in report.kills)
    assert len(report.store_restarts) == sizes.store_restarts
    assert len(report.error_replies) == sizes.error_replies
    assert len(report.failovers) == sizes.failovers
    assert report.duplicates >= MIN_DUPLICATE_SHARE * sizes.tasks
    details = "\n".join(report.problems[:20])
    for key in (report.double_executed + report.lost)[:3]:
        details += f"\n--- worker log lines for {key} ---\n" + "\n".join(
            run.worker_log_lines(key))
    assert not report.lost, f"{len(report.lost)} lost keys\n{details}"
    assert not report.double_executed, \
        f"{len(report.double_executed)} keys executed twice outside the window\n{details}"
    # A step whose value was recorded never runs again (the step in flight may: counted).
    assert not report.completed_steps_rerun, \
        f"{len(report.completed_steps_rerun)} completed steps re-run\n" + "\n".join(
            report.completed_steps_rerun[:10])
    # A plain SENTINEL FAILOVER (CHAOS_FAILOVER_MODE=sentinel) may lose acknowledged writes:
    # the double executions that straddle it are reported apart (failover_losses in the
    # summary), not failed on. A coordinated failover gets no such excuse: there they are
    # double executions above.
    assert not report.problems, details


def test_chaos_redis_broker(sizes: Sizes, effects_server: RedisServer,
                            store_server: RedisServer, tmp_path: Path) -> None:
    run = ChaosRun(broker="redis", broker_url=effects_server.url(0), store=store_server,
                   effects_url=effects_server.url(1), queue=unique("chaos"), log_dir=tmp_path,
                   sizes=sizes.for_single_server())
    check(run, run.run())


def test_chaos_sentinel_failover(sizes: Sizes, effects_server: RedisServer,
                                 tmp_path: Path) -> None:
    """The store is a Sentinel-managed primary and replica, failed over while tasks run (and
    answering error replies for a while); the Redis broker is never touched."""
    store = SentinelStore().start()
    try:
        run = ChaosRun(broker="redis", broker_url=effects_server.url(0), store=store,
                       effects_url=effects_server.url(1), queue=unique("chaos-sentinel"),
                       log_dir=tmp_path, sizes=sizes.for_sentinel())
        report = run.run()
    finally:
        store.close()
    check(run, report)


def test_chaos_rabbitmq_broker(sizes: Sizes, effects_server: RedisServer,
                               store_server: RedisServer, tmp_path: Path) -> None:
    if not rabbitmq_available():
        raise ServiceMissing(f"RabbitMQ is not reachable at {RABBITMQ_URL}")
    queue = unique("chaos-amqp")
    run = ChaosRun(broker="amqp", broker_url=RABBITMQ_URL, store=store_server,
                   effects_url=effects_server.url(1), queue=queue, log_dir=tmp_path,
                   sizes=sizes.for_single_server())
    try:
        report = run.run()
    finally:
        delete_amqp_queue(RABBITMQ_URL, queue)
    check(run, report)
