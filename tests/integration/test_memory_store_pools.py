"""The memory store (``memory://``) in real ``celery worker`` processes: refused by a pool that
runs tasks in several processes, working in one process, and invisible to other processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeoutError

from tests.integration import replay_app
from tests.support.integration import (
    Stack,
    redis_queue_length,
    redis_stack,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisServer
from tests.support.workers import ROOT, Worker

APP_MODULE = "tests.integration.replay_app"


@pytest.fixture
def memory_stack(redis_server: RedisServer) -> Iterator[Stack]:
    """A Redis broker and effects db, and the memory store, for the worker and this publisher."""
    base = redis_stack(redis_server)
    stack = Stack(broker_url=base.broker_url, store_url="memory://",
                  effects_url=base.effects_url, queue=base.queue)
    use_stack(replay_app.app, stack)
    yield stack


def counter(stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(stack.effects_url)


@pytest.mark.parametrize("pool", ["prefork", "processes"])
def test_a_prefork_worker_with_the_memory_store_is_refused_before_taking_a_message(
        memory_stack: Stack, pool: str) -> None:
    job = unique("never-run")
    replay_app.app.send_task(replay_app.plain.name, (job,), headers={"idempotency_key": job})
    broker = redis.Redis.from_url(memory_stack.broker_url)
    assert redis_queue_length(broker, memory_stack.queue) == 1
    env = {**os.environ, **memory_stack.worker_env(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", APP_MODULE, "worker", "-P", pool, "-c", "2",
         "-Q", memory_stack.queue, "--without-gossip", "--without-mingle",
         "--without-heartbeat", "--loglevel", "INFO"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "CRITICAL" in output and "ConfigurationError: " in output, output
    assert "idempotency_store_url='memory://'" in output, output
    assert "cannot be used with the worker pool 'prefork'" in output, output
    assert "replay.plain" in output and "-P solo, -P threads" in output, output
    # Refused while being built: it never connected, the message is still there.
    assert " ready." not in output
    assert redis_queue_length(broker, memory_stack.queue) == 1
    assert counter(memory_stack).get(f"deliveries:{job}") is None
    broker.close()


@pytest.mark.parametrize(("pool", "concurrency"), [("solo", 1), ("threads", 2)])
def test_a_single_process_worker_deduplicates_but_another_process_sees_nothing(
        memory_stack: Stack, tmp_path: Path, pool: str, concurrency: int) -> None:
    worker = Worker(APP_MODULE, memory_stack.worker_env(), pool=pool, concurrency=concurrency,
                    name=unique(f"mem-{pool}"), queues=memory_stack.queue,
                    log=tmp_path / "worker.log").start()
    effects = counter(memory_stack)
    try:
        # Two messages with one key, sent by name (nothing reserved at publish): the worker's
        # own memory deduplicates them.
        job = unique("mem")
        for _ in range(2):
            replay_app.app.send_task(replay_app.plain.name, (job,),
                                     headers={"idempotency_key": job})
        # (With threads both may start at once: the second waits for the first, then replays.)
        wait_for(lambda: f"key={job!r} already succeeded" in worker.output(),
                 what="the second message to replay the first one's result", worker=worker)
        assert int(effects.get(f"runs:{job}") or 0) == 1

        # A publisher in another process (this one) has its own memory: it never sees the
        # worker's outcome, so its handle cannot get the result.
        other = unique("mem-publisher")
        handle = replay_app.plain.apply_async((other,), idempotency_key=other)
        wait_for(lambda: int(effects.get(f"finished:{other}") or 0) == 1,
                 what="the worker to run the publisher's message", worker=worker)
        with pytest.raises(CeleryTimeoutError):
            handle.get(timeout=1.0)
    finally:
        worker.stop()
        effects.close()
