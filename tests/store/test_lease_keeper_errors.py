"""The lease keeper thread survives any exception a store raises while renewing (a raw
ResponseError used to end it: "Exception in thread idempotency-leases"), and renews again."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery_idempotency import MemoryKeyStore, RecordRef
from celery_idempotency.leases import LeaseKeeper
from tests.support.records import REF


class FlakyRenewals(MemoryKeyStore):
    """A memory store whose first renewals raise what no store should: a bare exception."""

    def __init__(self, failures: int) -> None:
        super().__init__(prefix="t:")
        self.failures = failures
        self.calls = 0
        self.renewed = threading.Event()

    def renew(self, ref: RecordRef, *, owner: str, lease_ms: int) -> bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("something no store error class covers")
        renewed = super().renew(ref, owner=owner, lease_ms=lease_ms)
        self.renewed.set()
        return renewed


def _claim(store: MemoryKeyStore, lease_ms: int) -> int:
    """Claim REF as "o1"; returns the claim's fence."""
    return store.claim(REF, task_id="t1", owner="o1", fingerprint="fp",
                       task_name="tasks.charge", lease_ms=lease_ms, ttl_ms=60_000).fence


def test_the_keeper_survives_a_raw_exception_and_renews_again(caplog: Any) -> None:
    store = FlakyRenewals(failures=2)
    fence = _claim(store, lease_ms=300)
    keeper = LeaseKeeper()
    token = keeper.hold(store, REF, "o1", 300, fence=fence)
    try:
        assert store.renewed.wait(10), "never renewed after the errors"
        thread = keeper._thread
        assert thread is not None and thread.is_alive()
        lease_before = store.get(REF).lease_expires_ms  # type: ignore[union-attr]
        time.sleep(0.5)
        assert store.get(REF).lease_expires_ms > lease_before  # type: ignore[union-attr]
        assert thread.is_alive() and keeper._thread is thread  # the same thread, not a new one
    finally:
        assert keeper.release(token)  # not reported lost: the claim was kept
    assert "could not renew the lease of key 'order-42'" in caplog.text
    assert "RuntimeError" in caplog.text  # the unexpected error comes with its traceback
