"""Fast bulk seeding for the large-store tests and timings: records written with a Redis pipeline
straight in the record layout of `celery_idempotency.records` (what the Lua scripts write)."""

from __future__ import annotations

import json
from collections import Counter

import redis

from celery_idempotency import KeyState, RecordRef
from celery_idempotency.records import (
    F_CREATED,
    F_ERROR,
    F_FENCE,
    F_FINGERPRINT,
    F_KEY,
    F_LEASE,
    F_OWNER,
    F_RESULT,
    F_RETRYABLE,
    F_SCOPE,
    F_STATE,
    F_TASK_ID,
    F_TASK_NAME,
    F_UPDATED,
    state_code,
)
from tests.support.records import DAY_MS

STATES = ("pending", "started", "succeeded", "failed")
SCOPES = ("shop.charge", "receipts")
_ERROR = json.dumps({"type": "shop.Declined", "message": "declined", "args": ["declined"]})


def seed(client: redis.Redis, count: int, *, prefix: str = "idem:", now_ms: int,
         chunk: int = 10_000) -> dict[str, int]:
    """Write ``count`` records: states round-robin, every other claim stale, two scopes,
    record ``i`` created ``i`` ms before ``now_ms`` (so the last one is the oldest).

    Returns the expected counts: per state, ``"stale"`` and per ``"scope:<name>"``.
    """
    expected: Counter[str] = Counter()
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        state = STATES[i % 4]
        scope = SCOPES[(i // 4) % 2]
        created = now_ms - i
        fields: dict[str, str | bytes | int] = {
            F_KEY: f"key-{i:07d}", F_SCOPE: scope, F_TASK_NAME: scope,
            F_STATE: state_code(KeyState(state)), F_TASK_ID: f"task-{i}", F_FINGERPRINT: "fp",
            F_UPDATED: created}
        if state != "succeeded":  # a succeeded record keeps neither (its age: F_UPDATED)
            fields[F_CREATED] = created
        if state != "pending":
            fields[F_FENCE] = 1
        if state in ("started", "failed"):
            fields[F_OWNER] = f"worker-{i % 7}"
        if state == "started":
            stale = (i // 4) % 2 == 0
            fields[F_LEASE] = now_ms - 60_000 if stale else now_ms + 3_600_000
            expected["stale"] += stale
        elif state == "succeeded":
            fields[F_RESULT] = json.dumps({"order": i, "ok": True})
        elif state == "failed":
            fields.update({F_ERROR: _ERROR, F_RETRYABLE: "0"})
        name = RecordRef(scope, f"key-{i:07d}").store_key(prefix)
        pipe.hset(name, mapping=fields)
        pipe.pexpire(name, DAY_MS)
        expected[state] += 1
        expected[f"scope:{scope}"] += 1
        if (i + 1) % chunk == 0:
            pipe.execute()
    pipe.execute()
    return dict(expected)
