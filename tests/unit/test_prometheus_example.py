"""examples/prometheus_metrics.py: each counter moves when its signal is sent, by a real
deduplicated publish, replay, takeover and ownership loss (eager mode, memory store)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from celery_idempotency import IdempotentTask, MemoryKeyStore, RecordRef
from examples import prometheus_metrics  # noqa: F401  (connects the receivers)
from tests.support.records import take_claim_away

KEY = "order-42"


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("prometheus", set_as_current=False)
    app.conf.update(task_always_eager=True, idempotency_store_url="memory://")
    yield app


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def make_task(app: Celery, name: str, **options: Any) -> Any:
    @app.task(shared=False, base=IdempotentTask, bind=True, name=name, **options)
    def charge(self: Any, order_id: int) -> int:
        return order_id

    return charge


def store_of(task: Any) -> MemoryKeyStore:
    store = task.idem_store()
    assert isinstance(store, MemoryKeyStore)
    return store


def test_deduplicated_publishes_are_counted(app: Celery) -> None:
    task = make_task(app, "prom.dedup")
    before = sample("idempotency_deduplicated_publishes_total", task="prom.dedup")
    task.apply_async((42,), idempotency_key=KEY)
    task.apply_async((42,), idempotency_key=KEY)
    task.apply_async((42,), idempotency_key=KEY)
    assert sample("idempotency_deduplicated_publishes_total", task="prom.dedup") == before + 2


def test_replays_are_counted_by_state(app: Celery) -> None:
    task = make_task(app, "prom.replay")
    before = sample("idempotency_replays_total", task="prom.replay", state="succeeded")
    task.apply((42,), headers={"idempotency_key": KEY}).get()
    task.apply((42,), headers={"idempotency_key": KEY}).get()
    assert sample("idempotency_replays_total", task="prom.replay", state="succeeded") == before + 1


def test_takeovers_are_counted(app: Celery) -> None:
    task = make_task(app, "prom.takeover", idempotency_busy_retry_delay=0.05)
    before = sample("idempotency_takeovers_total", task="prom.takeover")
    target = task.key_target((42,), {}, key=KEY, message_options={})
    store_of(task).claim(target.ref, task_id="ghost", owner="ghost-owner",
                         fingerprint=target.fingerprint, task_name=task.name,
                         lease_ms=100, ttl_ms=60_000)
    task.apply((42,), headers={"idempotency_key": KEY}).get()  # busy, then taken over
    assert sample("idempotency_takeovers_total", task="prom.takeover") == before + 1


def test_ownership_losses_are_counted(app: Celery) -> None:
    @app.task(shared=False, base=IdempotentTask, bind=True, name="prom.lost")
    def loses_its_claim(self: Any, order_id: int) -> int:
        take_claim_away(store_of(self), RecordRef(self.name, KEY))
        return order_id

    before = sample("idempotency_ownership_losses_total", task="prom.lost")
    loses_its_claim.apply((42,), headers={"idempotency_key": KEY}).get()
    assert sample("idempotency_ownership_losses_total", task="prom.lost") == before + 1
