"""A reservation covers its message's countdown/eta: its TTL is idempotency_ttl plus the delay,
and its pending deadline idempotency_pending_timeout plus the delay (published to an in-memory
broker, no worker: only the reservation is looked at)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from celery import Celery

from celery_idempotency import IdempotentTask, KeyState, RecordRef


@pytest.fixture
def task() -> Iterator[Any]:
    app = Celery("reservation-ttl", broker="memory://", set_as_current=False)
    app.conf.update(idempotency_store_url="memory://", idempotency_ttl=3,
                    idempotency_lease=1, idempotency_pending_timeout=2)

    @app.task(shared=False, base=IdempotentTask, name="tests.later")
    def later(order_id: int) -> int:
        return order_id

    yield later


@pytest.mark.parametrize("delay", [
    {"countdown": 5},
    {"eta": "in 5 s as a datetime"},
    {"eta": "in 5 s as an ISO 8601 string"},
], ids=["countdown", "eta-datetime", "eta-string"])
def test_reservation_lives_ttl_plus_countdown_with_a_deadline_past_it(
        task: Any, delay: dict[str, Any]) -> None:
    moment = datetime.now(timezone.utc) + timedelta(seconds=5)
    if "eta" in delay:
        delay = {"eta": moment if "datetime" in delay["eta"] else moment.isoformat()}
    store = task.idem_store()
    before = store.now_ms()
    task.apply_async((1,), idempotency_key="later-1", **delay)
    entry = store.entry(RecordRef(task.name, "later-1"))
    assert entry is not None and entry.record is not None
    assert entry.record.state is KeyState.PENDING
    assert entry.ttl_ms is not None and 7_500 < entry.ttl_ms <= 8_000  # 3 s + 5 s
    deadline = entry.record.pending_deadline_ms
    assert deadline is not None and before + 6_500 < deadline <= store.now_ms() + 7_000
