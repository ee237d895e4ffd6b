"""A protocol `Execution` driven directly by unit tests (no Celery): the store is given, and a
re-send is recorded as `Resent` instead of published."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery_idempotency.config import IdempotencyConfig
from celery_idempotency.protocol import Execution
from celery_idempotency.result import accept_for
from celery_idempotency.store import KeyStore


class Resent(Exception):
    """What `DirectExecution.republish_later` returns (the protocol raises it)."""

    def __init__(self, delay: float, headers: Mapping[str, Any]) -> None:
        super().__init__(delay)
        self.delay, self.headers = delay, dict(headers)


class DirectExecution(Execution):
    """Subclasses set ``store`` and say what running the task means (`run_task`)."""

    store: KeyStore

    def open_store(self, config: IdempotencyConfig) -> KeyStore:
        return self.store

    def accept_for(self, serializer: str) -> Any:
        return accept_for(serializer)

    def message_requeues(self) -> bool:
        return False

    def republish_later(self, delay: float, extra_headers: Mapping[str, Any]) -> BaseException:
        return Resent(delay, extra_headers)
