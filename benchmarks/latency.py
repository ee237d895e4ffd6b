"""Section 6: the worker-side cost of a task, as a distribution, against the physical floor.

* ``PING``: one round trip with the store's own redis-py client (the floor);
* ``claim`` + ``complete``: the two store calls a worker makes around a unique task, timed
  one pair at a time on pending records (reserved beforehand, outside the timing, as a
  publisher does);
* the whole worker-side path in-process: ``Task.apply()`` of the benchmark's `IdempotentTask`
  (with the key and fingerprint headers a published message carries) minus ``Task.apply()`` of
  the same plain task: claim, complete, key resolution, result encoding, lease bookkeeping;
* the same path decomposed: once with ``RedisKeyStore.claim``/``complete`` replaced (in this
  process, for those blocks only) by one ``PING`` each (the round-trip floor of the design),
  once by no call at all (the library's own Python). Real minus PING-stubbed = what the Lua
  scripts and their arguments/replies cost above a bare round trip;
* the Redis CPU of each script (``INFO commandstats``: EVALSHA's time per call, which counts
  the commands a script calls), reserve, claim and complete each run alone over a batch of
  unique keys: what a round trip does not show on a fast machine.

Blocks of each are interleaved so that a burst of noise hits all of them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery_idempotency.keys import RecordRef
from celery_idempotency.leases import new_owner_token
from celery_idempotency.outcomes import encode_result
from celery_idempotency.store import ClaimStatus, RedisKeyStore
from celery_idempotency.store.base import Claim

from . import app as bench_app
from .stack import Stack, percentile

TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 60_000
TASK_NAME = "bench.latency"  # also the scope of its records
FINGERPRINT = "f" * 16
BLOCK = 100


def _stats(values: list[float]) -> dict[str, float]:
    micros = [v * 1e6 for v in values]
    return {"p50_us": percentile(micros, 0.5), "p90_us": percentile(micros, 0.9),
            "p99_us": percentile(micros, 0.99), "mean_us": sum(micros) / len(micros),
            "n": len(micros)}


def _new_refs(count: int) -> list[tuple[RecordRef, str]]:
    """``count`` unique keys of the benchmark's task, each with a task id."""
    return [(RecordRef(TASK_NAME, uuid.uuid4().hex), str(uuid.uuid4())) for _ in range(count)]


def _reserve(store: RedisKeyStore, ref: RecordRef, task_id: str) -> None:
    store.reserve(ref, task_id=task_id, fingerprint=FINGERPRINT, task_name=TASK_NAME,
                  ttl_ms=TTL_MS)


def _claim(store: RedisKeyStore, ref: RecordRef, task_id: str, owner: str) -> Claim:
    return store.claim(ref, task_id=task_id, owner=owner, fingerprint=FINGERPRINT,
                       task_name=TASK_NAME, lease_ms=LEASE_MS, ttl_ms=TTL_MS)


def _script_server_time(store: RedisKeyStore, payload: Any, count: int) -> dict[str, float]:
    """Server-side µs per call of reserve, claim and complete (no steps, no parked duplicates),
    each run alone over ``count`` unique keys."""
    client = store.client
    refs = _new_refs(count)
    owners: list[tuple[RecordRef, str, int]] = []

    def reserve_all() -> None:
        for ref, task_id in refs:
            _reserve(store, ref, task_id)

    def claim_all() -> None:
        for ref, task_id in refs:
            owner = new_owner_token()
            owners.append((ref, owner, _claim(store, ref, task_id, owner).fence))

    def complete_all() -> None:
        for ref, owner, fence in owners:
            store.complete(ref, owner=owner, fence=fence, result=payload, ttl_ms=TTL_MS)

    times = {}
    for name, run in (("reserve", reserve_all), ("claim", claim_all), ("complete", complete_all)):
        before = client.info("commandstats").get("cmdstat_evalsha", {})
        run()
        after = client.info("commandstats")["cmdstat_evalsha"]
        calls = int(after["calls"]) - int(before.get("calls", 0))
        times[name] = (float(after["usec"]) - float(before.get("usec", 0))) / max(1, calls)
    client.delete(*(store.store_key(ref) for ref, _ in refs))
    return times


def worker_latency(stack: Stack, *, iterations: int, log: Any) -> dict[str, Any]:
    store = RedisKeyStore.from_url(stack.store.url(0))
    client = store.client
    payload = encode_result({"item": 1, "ok": True}, serializer="json", max_bytes=1 << 19,
                            key="k", task_id="t")
    samples: dict[str, list[float]] = {"ping": [], "claim": [], "complete": [],
                                       "claim+complete": [], "apply plain": [],
                                       "apply idempotent": [],
                                       "apply idempotent, store calls = PING": [],
                                       "apply idempotent, store calls free": []}
    stack.configure_publisher("redis", "idem-bench-latency-unused")
    plain, idem = bench_app.plain, bench_app.idem
    run = uuid.uuid4().hex[:8]

    def pending_refs(count: int) -> list[tuple[RecordRef, str]]:
        refs = _new_refs(count)
        for ref, task_id in refs:
            _reserve(store, ref, task_id)
        return refs

    def block_ping() -> None:
        for _ in range(BLOCK):
            start = time.perf_counter()
            client.ping()
            samples["ping"].append(time.perf_counter() - start)

    def block_store() -> None:
        for ref, task_id in pending_refs(BLOCK):
            owner = new_owner_token()
            start = time.perf_counter()
            claim = _claim(store, ref, task_id, owner)
            middle = time.perf_counter()
            store.complete(ref, owner=owner, fence=claim.fence, result=payload, ttl_ms=TTL_MS)
            end = time.perf_counter()
            samples["claim"].append(middle - start)
            samples["complete"].append(end - middle)
            samples["claim+complete"].append(end - start)

    counter = [0]
    real = RedisKeyStore.claim, RedisKeyStore.complete

    def stub(ping: bool) -> None:
        def claim(self: RedisKeyStore, ref: RecordRef, **_: Any) -> Claim:
            if ping:
                self.client.ping()
            return Claim(ClaimStatus.CLAIMED, fence=1)

        def complete(self: RedisKeyStore, ref: RecordRef, **_: Any) -> list[Any]:
            if ping:
                self.client.ping()
            return []  # no parked duplicates

        RedisKeyStore.claim, RedisKeyStore.complete = claim, complete  # type: ignore[method-assign]

    def block_apply(task: Any, name: str) -> None:
        if name.endswith("= PING"):
            stub(ping=True)
        elif name.endswith("free"):
            stub(ping=False)
        try:
            _block_apply(task, name)
        finally:
            RedisKeyStore.claim, RedisKeyStore.complete = real  # type: ignore[method-assign]

    def _block_apply(task: Any, name: str) -> None:
        for _ in range(BLOCK):
            counter[0] += 1
            args = (run, counter[0])
            headers: dict[str, Any] = {}
            if task is idem:  # what apply_async stamps on a published message
                headers = bench_app.published_headers(idem, f"latency-{run}-{counter[0]}", args)
            start = time.perf_counter()
            outcome = task.apply(args, headers=headers)
            samples[name].append(time.perf_counter() - start)
            if outcome.state != "SUCCESS":
                raise RuntimeError(f"{name}: {outcome.state} {outcome.traceback}")

    blocks = [block_ping, block_store, lambda: block_apply(plain, "apply plain"),
              lambda: block_apply(idem, "apply idempotent"),
              lambda: block_apply(idem, "apply idempotent, store calls = PING"),
              lambda: block_apply(idem, "apply idempotent, store calls free")]
    for block in blocks:  # warm-up
        block()
    for values in samples.values():
        values.clear()
    for _ in range(max(1, iterations // BLOCK)):
        for block in blocks:
            block()
    stack.effects.delete(f"bench:n:{run}", f"bench:k:{run}")
    stats = {name: _stats(values) for name, values in samples.items()}
    server = _script_server_time(store, payload, max(1000, iterations))
    ping = stats["ping"]["p50_us"]
    plain_p50 = stats["apply plain"]["p50_us"]
    overhead_p50 = stats["apply idempotent"]["p50_us"] - plain_p50
    python = stats["apply idempotent, store calls free"]["p50_us"] - plain_p50
    floor = stats["apply idempotent, store calls = PING"]["p50_us"] - plain_p50 - python
    result = {
        "iterations": len(samples["ping"]),
        "stats": stats,
        "claim_complete_p50_over_ping_p50": stats["claim+complete"]["p50_us"] / ping,
        "claim_complete_p99_over_ping_p50": stats["claim+complete"]["p99_us"] / ping,
        "apply_overhead_p50_us": overhead_p50,
        "apply_overhead_p50_over_ping_p50": overhead_p50 / ping,
        "overhead_decomposition_p50_us": {
            "library Python (store calls free)": python,
            "two bare round trips (store calls = PING)": floor,
            "scripts above a bare round trip (real minus PING)": overhead_p50 - python - floor,
        },
        "script_server_us_per_call": server,
    }
    log(f"[latency] PING p50 {ping:.0f} us; claim+complete p50 "
        f"{stats['claim+complete']['p50_us']:.0f} us "
        f"({result['claim_complete_p50_over_ping_p50']:.2f}x PING), p99 "
        f"{stats['claim+complete']['p99_us']:.0f} us; apply() overhead p50 {overhead_p50:.0f} us "
        f"(Python {python:.0f}, round trips {floor:.0f}, scripts "
        f"{overhead_p50 - python - floor:.0f}); Redis CPU per script call: "
        + ", ".join(f"{name} {us:.1f} us" for name, us in server.items()))
    store.close()
    return result
