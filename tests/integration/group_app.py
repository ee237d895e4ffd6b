"""The Celery app of the group tests (tests/integration/test_group_batch.py), run by real
workers: as ``tests.integration.app`` (BROKER_URL, STORE_URL, EFFECTS_URL, QUEUE, EXTRA_CONF),
with a result backend (a group's and a chord's results need one), given in EXTRA_CONF."""

from __future__ import annotations

import json
import os
from typing import Any

from celery_idempotency import IdempotentTask
from tests.support.apps import RedisFromEnv, worker_app

app = worker_app("grouptest")
app.conf.update(json.loads(os.environ.get("EXTRA_CONF") or "{}"))

effects = RedisFromEnv("EFFECTS_URL")  # effects(): the side-effect db's client


@app.task(base=IdempotentTask, bind=True)
def charge(self: Any, order_id: int, amount: int = 100) -> dict[str, Any]:
    count = int(effects().incr(f"effect:group.charge:{order_id}"))
    return {"order_id": order_id, "amount": amount, "run": count, "task_id": self.request.id}


@app.task(bind=True)
def total(self: Any, results: list[dict[str, Any]], tag: str) -> int:
    """A chord's callback: counts its runs (per ``tag``) and sums the amounts."""
    effects().incr(f"effect:group.total:{tag}")
    return sum(result["amount"] for result in results)


@app.task
def echo(value: Any) -> Any:
    """A plain task: a member of a group next to idempotent ones, or a chain's second step."""
    return {"echo": value}
