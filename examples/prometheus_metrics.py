"""Prometheus counters from the library's signals, with prometheus_client.

Import this module once in every process that publishes or runs idempotent tasks (for a
worker: in the module ``celery -A`` loads, e.g. ``examples/shop.py``), and expose the
registry as you already do (``prometheus_client.start_http_server``, a ``/metrics`` view).
A worker's prefork pool processes count on their own: use prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``) to expose them together.

The counters:

- ``idempotency_deduplicated_publishes_total{task}``: publishes not sent, their key was known;
- ``idempotency_replays_total{task,state}``: executions that replayed a cached outcome
  (``state``: succeeded or failed) instead of running;
- ``idempotency_takeovers_total{task}``: claims taken over from an owner whose lease expired
  (a worker died or froze mid-task);
- ``idempotency_ownership_losses_total{task}``: outcome writes refused because the claim had
  passed to another owner (alert on it: a task ran past its lease).

Labels are task names, never keys (a key per label value would grow without bound). With
OpenTelemetry, ``celery_idempotency.otel.instrument()`` counts the same things through the
OTel metrics API instead.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from celery_idempotency import signals

DEDUPLICATED = Counter("idempotency_deduplicated_publishes",
                       "Publishes not sent because their idempotency key was known", ["task"])
REPLAYS = Counter("idempotency_replays", "Executions that replayed a cached outcome",
                  ["task", "state"])
TAKEOVERS = Counter("idempotency_takeovers",
                    "Claims taken over from an owner whose lease had expired", ["task"])
OWNERSHIP_LOSSES = Counter("idempotency_ownership_losses",
                           "Outcome writes refused: the claim had passed to another owner",
                           ["task"])


def _task(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "unknown")


# Receivers are module-level functions: Celery's signals hold them weakly, the module keeps
# them alive. A receiver that raises is logged by Celery and never affects the task.
@signals.duplicate_published.connect
def count_deduplicated(sender: Any = None, **_: Any) -> None:
    DEDUPLICATED.labels(_task(sender)).inc()


@signals.outcome_replayed.connect
def count_replay(sender: Any = None, state: str | None = None, **_: Any) -> None:
    REPLAYS.labels(_task(sender), state or "unknown").inc()


@signals.lease_taken_over.connect
def count_takeover(sender: Any = None, **_: Any) -> None:
    TAKEOVERS.labels(_task(sender)).inc()


@signals.ownership_lost.connect
def count_ownership_loss(sender: Any = None, **_: Any) -> None:
    OWNERSHIP_LOSSES.labels(_task(sender)).inc()
