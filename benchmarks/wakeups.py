"""Section 7: waiting without polling.

* completion write -> a waiting ``IdempotentResult.get()`` returns, for 1 and for 100
  concurrent waiters (threads of this process, sharing the store object and so one subscriber
  connection), on the Redis store and on the memory store; and the same on Redis with
  notifications switched off (the polling fallback, what every waiter did before);
* a duplicate *message* blocked by a live owner (a real prefork worker): the time from the
  owner's completion to the duplicate's ``link`` callback running, for a short owner (the
  duplicate waits in the worker, woken) and long ones (re-sent with backoff and parked: the
  owner's completion publishes it again at once); the re-send counts are in
  tests/integration/test_busy_backoff.py (measured lines).

Times are ``time.perf_counter()`` in this process; the completion time of the worker-side
owner is when this process is woken by the store (one pub/sub hop after the write).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from celery import Celery

from celery_idempotency.keys import RecordRef
from celery_idempotency.leases import new_owner_token
from celery_idempotency.outcomes import encode_result
from celery_idempotency.records import KeyState
from celery_idempotency.result import IdempotentResult, accept_for
from celery_idempotency.store import KeyStore, MemoryKeyStore, RedisKeyStore
from celery_idempotency.store.wakeups import wake_channel

from . import app as bench_app
from .stack import STORE_DB, Stack, percentile

TTL_MS = 3600 * 1000
LEASE_MS = 60_000
# Targets.
GET_P50_MS, GET_P99_MS = 2.0, 10.0
DUPLICATE_CALLBACK_P50_MS = 50.0


def _stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50_ms": percentile(ms, 0.5), "p90_ms": percentile(ms, 0.9),
            "p99_ms": percentile(ms, 0.99), "max_ms": max(ms), "n": len(ms)}


def _subscribed(store: KeyStore, asker: KeyStore, ref: RecordRef) -> bool:
    if not isinstance(store, RedisKeyStore) or store._waker is None:
        return True
    assert isinstance(asker, RedisKeyStore)
    channel = wake_channel(store.store_key(ref))
    reply = asker.client.execute_command(  # type: ignore[no-untyped-call]
        "PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1]) >= 1


def _get_latencies(reader: KeyStore, writer: KeyStore, *, waiters: int,
                   iterations: int) -> list[float]:
    app = Celery("bench-wakeups", set_as_current=False)
    payload = encode_result({"ok": True}, serializer="json", max_bytes=1 << 19, key="k",
                            task_id="t")
    samples: list[float] = []
    for _ in range(iterations):
        ref = RecordRef("bench.wakeups", uuid.uuid4().hex)
        owner = new_owner_token()
        fence = writer.claim(ref, task_id="t", owner=owner, fingerprint="f" * 16,
                             task_name="bench.wakeups", lease_ms=LEASE_MS, ttl_ms=TTL_MS).fence
        returned = [0.0] * waiters
        gate = threading.Barrier(waiters + 1)

        def wait(index: int, ref: RecordRef = ref, gate: threading.Barrier = gate,
                 returned: list[float] = returned) -> None:
            handle = IdempotentResult("t", store=reader, ref=ref, accept=accept_for("json"),
                                      duplicate=True, app=app)
            gate.wait()
            if handle.get(timeout=60) != {"ok": True}:
                raise RuntimeError("wrong result")
            returned[index] = time.perf_counter()

        threads = [threading.Thread(target=wait, args=(i,)) for i in range(waiters)]
        for thread in threads:
            thread.start()
        gate.wait()
        # Asked on the writer's connection: the reader's pool is the waiters' (redis-py 8
        # limits a pool to 100 connections, which 100 waiters' first reads already take).
        while not _subscribed(reader, writer, ref):
            time.sleep(0.001)
        time.sleep(0.02 + waiters * 0.003)  # let every waiter reach its wait (a loaded machine)
        start = time.perf_counter()
        writer.complete(ref, owner=owner, fence=fence, result=payload, ttl_ms=TTL_MS)
        for thread in threads:
            thread.join()
        samples.extend(moment - start for moment in returned)
    return samples


def _duplicate_callbacks(stack: Stack, *, owner_ms: float, rounds: int,
                         log: Any) -> dict[str, Any]:
    """Owner task (``owner_ms`` of work) and a duplicate message of it with a link callback:
    owner's completion -> callback ran."""
    watcher = RedisKeyStore.from_url(stack.store.url(STORE_DB))
    lags: list[float] = []
    with stack.worker("redis", "prefork", concurrency=2) as worker:
        for _ in range(rounds):
            run, key = uuid.uuid4().hex[:10], uuid.uuid4().hex
            callback_run = f"{run}-cb"
            ref = RecordRef(bench_app.IDEM, key)
            args = (run, 1, owner_ms)
            with watcher.watch(ref) as watch:
                bench_app.idem.apply_async(args, idempotency_key=key)
                while (record := watcher.get(ref)) is None or record.state is KeyState.PENDING:
                    time.sleep(0.001)
                bench_app.app.send_task(bench_app.IDEM, args=args,
                                        headers={"idempotency_key": key},
                                        link=bench_app.plain.si(callback_run, 1))
                while True:
                    record = watcher.get(ref)
                    if record is not None and record.state is KeyState.SUCCEEDED:
                        break
                    watch.wait(2.0)
                done = time.perf_counter()
            called = stack.wait_count(f"bench:n:{callback_run}", 1, timeout=120, worker=worker,
                                      interval=0.001, stall_after=120)
            lags.append(called - done)
    watcher.close()
    result: dict[str, Any] = {"owner_ms": owner_ms, "callback_after_completion": _stats_ms(lags),
              "samples_ms": [round(v * 1000, 1) for v in lags]}
    log(f"[wakeups] duplicate of a {owner_ms:.0f} ms owner: callback "
        f"p50 {result['callback_after_completion']['p50_ms']:.1f} ms after the completion")
    return result


def wakeups(stack: Stack, *, iterations: int, rounds: int, log: Any) -> dict[str, Any]:
    url = stack.store.url(STORE_DB)
    results: dict[str, Any] = {"get": {}, "duplicates": {}}
    writer = RedisKeyStore.from_url(url)
    pings = []
    for _ in range(300):  # the round-trip floor now (the machine is shared: it moves)
        start = time.perf_counter()
        writer.client.ping()
        pings.append(time.perf_counter() - start)
    results["ping"] = _stats_ms(pings)
    log(f"[wakeups] PING p50 {results['ping']['p50_ms']:.2f} ms, "
        f"p99 {results['ping']['p99_ms']:.2f} ms")
    for waiters in (1, 100):
        count = max(3, iterations // waiters) if waiters > 1 else iterations
        reader = RedisKeyStore.from_url(url)
        results["get"][f"redis, {waiters} waiter(s)"] = _stats_ms(
            _get_latencies(reader, writer, waiters=waiters, iterations=count))
        reader.close()
        memory = MemoryKeyStore()
        results["get"][f"memory, {waiters} waiter(s)"] = _stats_ms(
            _get_latencies(memory, memory, waiters=waiters, iterations=count))
        polling = RedisKeyStore.from_url(url)
        polling._waker = None  # the fallback: what every waiter did before
        results["get"][f"redis polling (before), {waiters} waiter(s)"] = _stats_ms(
            _get_latencies(polling, writer, waiters=waiters, iterations=max(3, count // 10)))
        polling.close()
    writer.close()
    for name, stats in results["get"].items():
        log(f"[wakeups] get() after completion, {name}: p50 {stats['p50_ms']:.2f} ms, "
            f"p99 {stats['p99_ms']:.2f} ms (n={stats['n']})")
    for owner_ms, owner_rounds in ((200.0, rounds), (3000.0, rounds),
                                   (10_000.0, max(2, rounds // 3))):
        results["duplicates"][f"owner {owner_ms / 1000:g} s"] = _duplicate_callbacks(
            stack, owner_ms=owner_ms, rounds=owner_rounds, log=log)
    results["targets"] = wakeup_targets(results)
    return results


def wakeup_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for name, stats in results["get"].items():
        if "polling" in name:
            continue
        checks.append({"target": f"completion -> get() returns, {name}: p50 <= {GET_P50_MS} ms",
                       "value": round(stats["p50_ms"], 2), "met": stats["p50_ms"] <= GET_P50_MS})
        checks.append({"target": f"completion -> get() returns, {name}: p99 <= {GET_P99_MS} ms",
                       "value": round(stats["p99_ms"], 2), "met": stats["p99_ms"] <= GET_P99_MS})
    for name, block in results["duplicates"].items():
        p50 = block["callback_after_completion"]["p50_ms"]
        checks.append({"target": f"busy duplicate's callback after completion, {name}: "
                       f"p50 <= {DUPLICATE_CALLBACK_P50_MS:.0f} ms", "value": round(p50, 1),
                       "met": p50 <= DUPLICATE_CALLBACK_P50_MS})
    return checks
