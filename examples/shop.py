"""The README's quickstart shop: a ``send_receipt`` task that must send one receipt per order,
however often it is published or delivered.

Run a worker with ``celery -A examples.shop worker`` (from the repository root, or with it on
PYTHONPATH). Configured from the environment:

``BROKER_URL``             the Celery broker (default ``redis://127.0.0.1:6379/0``)
``IDEMPOTENCY_STORE_URL``  where idempotency keys live (default ``redis://127.0.0.1:6379/1``;
                           ``memory://`` for a single process, e.g. an in-process test worker)
``RECEIPTS_URL``           a Redis database where "sent" receipts are counted, so that every
                           process (worker children, the demo) sees the same counts; unset:
                           counted in this process only (enough with an in-process worker)
``SHOP_NAMESPACE``         queue name and prefix of idempotency keys and receipt counters
                           (default ``shop``), so that several shops or demo runs can share
                           one Redis without seeing each other's keys or messages
``IDEMPOTENCY_TTL``        how long keys and cached results are kept, in seconds (default:
                           the library's, 7 days)
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

import redis
from celery import Celery
from celery.signals import task_postrun
from celery.utils.log import get_task_logger

from celery_idempotency import IdempotentTask

BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")
STORE_URL = os.environ.get("IDEMPOTENCY_STORE_URL", "redis://127.0.0.1:6379/1")
RECEIPTS_URL = os.environ.get("RECEIPTS_URL") or None
NAMESPACE = os.environ.get("SHOP_NAMESPACE", "shop")
TASK_NAME = "shop.send_receipt"

app = Celery("shop", broker=BROKER_URL)
app.conf.update(
    idempotency_store_url=STORE_URL,
    idempotency_key_prefix=f"{NAMESPACE}:idem:",
    task_default_queue=NAMESPACE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # polling_interval: how often the memory and SQS-like transports look for messages.
    broker_transport_options={"polling_interval": 0.1},
)
if os.environ.get("IDEMPOTENCY_TTL"):
    app.conf.idempotency_ttl = float(os.environ["IDEMPOTENCY_TTL"])

logger = get_task_logger(__name__)


class ReceiptLog:
    """Stand-in for a mailer, and the audit that shows what really happened.

    ``send`` is the side effect that must happen once per order (an INCR in Redis, or a counter
    in this process); ``deliveries`` lists every message the worker finished, replays included.
    """

    def __init__(self, url: str | None, namespace: str) -> None:
        self.url = url
        self.prefix = f"{namespace}:receipts:"
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._deliveries: list[str] = []

    @property
    def where(self) -> str:
        return self.url or f"the memory of process {os.getpid()}"

    def client(self) -> redis.Redis:
        if self._client is None:
            assert self.url is not None
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def send(self, order_id: int, channel: str) -> int:
        """"Send" a receipt; returns how many receipts this order has had on this channel."""
        name = f"{order_id}:{channel}"
        if self.url:
            return int(self.client().incr(self.prefix + name))
        with self._lock:
            self._counts[name] += 1
            return self._counts[name]

    def sent(self, order_id: int, channel: str = "email") -> int:
        name = f"{order_id}:{channel}"
        if self.url:
            return int(self.client().get(self.prefix + name) or 0)
        with self._lock:
            return self._counts[name]

    def delivered(self, task_id: str, state: str) -> None:
        entry = f"{task_id} {state}"
        if self.url:
            self.client().rpush(self.prefix + "deliveries", entry)
        else:
            with self._lock:
                self._deliveries.append(entry)

    def deliveries(self) -> list[tuple[str, str]]:
        """``(task_id, state)`` of every message a worker finished with, oldest first."""
        if self.url:
            raw = self.client().lrange(self.prefix + "deliveries", 0, -1)
            entries = [e.decode() if isinstance(e, bytes) else str(e) for e in raw]
        else:
            with self._lock:
                entries = list(self._deliveries)
        return [(task_id, state) for task_id, _, state in (e.partition(" ") for e in entries)]


receipts = ReceiptLog(RECEIPTS_URL, NAMESPACE)


# An explicit name: the task is the same whether this module is imported as ``examples.shop``
# (the worker) or otherwise, and other services can send it by name (app.send_task).
@app.task(name=TASK_NAME, base=IdempotentTask, bind=True, acks_late=True)
def send_receipt(self: Any, order_id: int, channel: str = "email") -> dict[str, Any]:
    number = receipts.send(order_id, channel)  # runs once per key
    logger.info("SENT receipt #%d for order %s by %s", number, order_id, channel)
    return {"order_id": order_id, "channel": channel, "sent": True, "receipt_no": number}


@task_postrun.connect
def _audit_delivery(sender: Any = None, task_id: str | None = None, state: str | None = None,
                    **_: Any) -> None:
    # Every message the worker finishes, including those answered from the cached result.
    if getattr(sender, "name", None) == TASK_NAME and task_id and state:
        receipts.delivered(task_id, state)
