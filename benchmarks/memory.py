"""Section 5: memory per succeeded record in Redis (``used_memory`` delta / records).

Records are written by the library's own Lua transitions, reserve -> claim -> complete:

* a verification sample through the public `RedisKeyStore` methods (``reserve``, ``claim``,
  ``complete``), exactly as a publisher and a worker call them;
* the bulk through the *same registered scripts* (the store's own `Script` objects, EVALSHA),
  pipelined in batches, with the arguments `RedisKeyStore` passes.

Before the numbers count, the two are compared on a sample of records: same field names, same
value lengths, same hash encoding, same ``MEMORY USAGE``. A difference aborts the section.

A record: an HTTP-style idempotency key (a UUID, 36 characters), scope = task name
(``shop.tasks.send_receipt``), a Celery task id, the argument fingerprint and the result
``{"order_id": 1234567, "sent": true}`` (JSON, well under 64 bytes), TTL 7 days.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter
from typing import Any

import redis

from celery_idempotency.keys import RecordRef, fingerprint
from celery_idempotency.leases import new_owner_token
from celery_idempotency.outcomes import encode_result
from celery_idempotency.records import F_STATE
from celery_idempotency.store import RedisKeyStore
from celery_idempotency.store.redis import complete_args, script_args

from .services import RedisServer

TASK_NAME = "shop.tasks.send_receipt"
TTL_MS = 7 * 24 * 3600 * 1000
LEASE_MS = 60_000
BATCH = 2_000


def _result(order_id: int) -> Any:
    return encode_result({"order_id": order_id, "sent": True}, serializer="json",
                         max_bytes=512 * 1024, key="k", task_id="t")


PENDING_MS = 600_000  # idempotency_pending_timeout's default


def _identity(index: int) -> tuple[RecordRef, str, str]:
    ref = RecordRef(TASK_NAME, str(uuid.uuid4()))
    return ref, str(uuid.uuid4()), fingerprint({"order_id": 1_000_000 + index})


def seed_public(store: RedisKeyStore, start: int, count: int) -> list[str]:
    """Through the public store methods, one call at a time (the real publish/worker calls)."""
    names = []
    for index in range(start, start + count):
        ref, task_id, fp = _identity(index)
        store.reserve(ref, task_id=task_id, fingerprint=fp, task_name=TASK_NAME, ttl_ms=TTL_MS)
        owner = new_owner_token()
        claim = store.claim(ref, task_id=task_id, owner=owner, fingerprint=fp,
                            task_name=TASK_NAME, lease_ms=LEASE_MS, ttl_ms=TTL_MS)
        store.complete(ref, owner=owner, fence=claim.fence, result=_result(1_000_000 + index),
                       ttl_ms=TTL_MS)
        names.append(store.store_key(ref))
    return names


def seed_pipelined(store: RedisKeyStore, start: int, count: int) -> list[str]:
    """Through the store's own registered scripts, pipelined (same arguments as the store's
    methods pass; checked against `seed_public` by `compare_layout`)."""
    scripts = store._scripts
    names: list[str] = []
    for batch_start in range(start, start + count, BATCH):
        batch = range(batch_start, min(batch_start + BATCH, start + count))
        rows = []
        for index in batch:
            ref, task_id, fp = _identity(index)
            rows.append((store.store_key(ref), ref, task_id, fp, new_owner_token(),
                         _result(1_000_000 + index)))
        fences: list[int] = []  # each claim's, for its complete (as the worker passes it)
        for step in ("reserve", "claim", "complete"):
            pipe = store.client.pipeline(transaction=False)
            for row, (name, ref, task_id, fp, owner, result) in enumerate(rows):
                if step == "reserve":
                    args = script_args("reserve", task_id=task_id, fingerprint=fp, key=ref.key,
                                       scope=ref.scope, task_name=TASK_NAME, ttl_ms=TTL_MS,
                                       pending_ms=PENDING_MS)
                elif step == "claim":
                    args = script_args("claim", task_id=task_id, owner=owner, fingerprint=fp,
                                       key=ref.key, scope=ref.scope, task_name=TASK_NAME,
                                       lease_ms=LEASE_MS, ttl_ms=TTL_MS, park="", unpark="")
                else:
                    args = complete_args(owner=owner, fence=fences[row], result=result,
                                         ttl_ms=TTL_MS)
                scripts[step](keys=[name], args=args, client=pipe)
            replies = pipe.execute()
            expected = {"reserve": b"reserved", "claim": b"claimed", "complete": b"ok"}[step]
            bad = [reply for reply in replies if reply[0] != expected]
            if bad:
                raise RuntimeError(f"pipelined {step} answered {bad[0]!r}")
            if step == "claim":
                fences = [int(reply[1]) for reply in replies]
        names.extend(row[0] for row in rows)
    return names


def _layout(client: redis.Redis, name: str) -> dict[str, Any]:
    fields = client.hgetall(name)
    return {
        "fields": {k.decode(): len(v) for k, v in sorted(fields.items())},
        "encoding": client.object("encoding", name),
        "memory_usage": client.memory_usage(name, samples=0),
        "has_ttl": client.pttl(name) > 0,
        "state": fields.get(F_STATE.encode()),
    }


def compare_layout(client: redis.Redis, public: list[str], pipelined: list[str]) -> dict[str, Any]:
    """Same fields, value lengths, encoding and MEMORY USAGE on both paths, or an error."""
    a = [_layout(client, name) for name in public]
    b = [_layout(client, name) for name in pipelined]
    for what in ("fields", "encoding", "has_ttl", "state"):
        left = Counter(repr(item[what]) for item in a)
        right = Counter(repr(item[what]) for item in b)
        if set(left) != set(right):
            raise RuntimeError(f"records written by the pipelined scripts differ from the "
                               f"public store methods in {what}: {left} vs {right}")
    usage_a = statistics.median(item["memory_usage"] for item in a)
    usage_b = statistics.median(item["memory_usage"] for item in b)
    if usage_a != usage_b:
        raise RuntimeError(f"MEMORY USAGE differs: {usage_a} (public) vs {usage_b} (pipelined)")
    return {"sample": len(a), "fields": a[0]["fields"], "encoding": _text(a[0]["encoding"]),
            "memory_usage_median": usage_a, "identical": True}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def memory_per_record(*, checkpoints: list[int], sample: int, log: Any) -> dict[str, Any]:
    server = RedisServer(name="memory").start()
    try:
        client = server.client()
        store = RedisKeyStore.from_url(server.url())
        # Load the scripts and open the connections before the baseline.
        warm = seed_public(store, 0, 1) + seed_pipelined(store, 0, 1)
        client.delete(*warm)
        baseline = _used(client)
        info = client.info("memory")
        log(f"[memory] baseline used_memory {baseline} bytes "
            f"(allocator {info.get('mem_allocator')})")
        started = time.perf_counter()
        public = seed_public(store, 0, sample)
        written = sample
        verification: dict[str, Any] | None = None
        points: dict[str, Any] = {}
        for checkpoint in sorted(checkpoints):
            while written < checkpoint:
                count = min(50_000, checkpoint - written)
                names = seed_pipelined(store, written, count)
                if verification is None:
                    verification = compare_layout(client, public[:200], names[:200])
                written += count
            keys = int(client.dbsize())
            used = _used(client)
            per = (used - baseline) / keys
            points[str(checkpoint)] = {"records": keys, "used_memory_delta": used - baseline,
                                       "bytes_per_record": per}
            log(f"[memory] {keys} succeeded records: {per:.0f} bytes per record "
                f"({time.perf_counter() - started:.0f} s)")
        if verification is None:
            verification = compare_layout(client, public[:100], public[100:200])
        sample_names = public[:200]
        field_bytes = statistics.median(
            sum(len(k) + len(v) for k, v in client.hgetall(name).items())
            for name in sample_names)
        return {
            "method": (f"{sample} records through RedisKeyStore.reserve/claim/complete, the "
                       "rest through the same Lua scripts pipelined (EVALSHA); layouts "
                       "verified identical"),
            "result_json_bytes": len(_result(1_000_000).data),
            "points": points,
            "layout": verification,
            "raw_field_and_value_bytes_median": field_bytes,
            "key_name_bytes": len(public[0]),
            "redis_version": server.version(),
            "seconds": time.perf_counter() - started,
        }
    finally:
        server.close()
