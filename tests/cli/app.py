"""The Celery app the CLI tests run `celery -A tests.cli.app idempotency ...` against.

Configured from the environment: CLI_STORE_URL (unset: the app has no idempotency store, for the
"not configured" error) and CLI_KEY_PREFIX. Eager, so that tests seed keys by calling tasks.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_idempotency import IdempotentTask


class Declined(Exception):
    """Cached by `charge` (idempotency_cache_errors): replayed to duplicates."""


def make_app(store_url: str | None, prefix: str = "idem:") -> Celery:
    app = Celery("clitest", set_as_current=False)
    app.conf.update(task_always_eager=True, task_eager_propagates=True,
                    idempotency_key_prefix=prefix)
    if store_url:
        app.conf.idempotency_store_url = store_url

    @app.task(base=IdempotentTask, bind=True, name="shop.charge", shared=False,
              idempotency_cache_errors=(Declined,))
    def charge(self: Any, order_id: int, amount: int = 100) -> dict[str, Any]:
        if amount < 0:
            raise Declined(f"order {order_id}: negative amount")
        return {"order_id": order_id, "amount": amount, "charged": True}

    @app.task(base=IdempotentTask, bind=True, name="shop.receipt", shared=False,
              idempotency_scope="receipts")
    def receipt(self: Any, order_id: int) -> str:
        return f"receipt for order {order_id}"

    return app


app = make_app(os.environ.get("CLI_STORE_URL"), os.environ.get("CLI_KEY_PREFIX", "idem:"))
