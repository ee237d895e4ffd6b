"""The lease keeper: renews held leases from one thread, and tells a lost lease from one whose
task has just finished."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytest

from celery_idempotency import KeyState, MemoryKeyStore, RecordRef
from celery_idempotency.leases import LeaseKeeper, new_owner_token, owner_prefix
from tests.support.records import REF, RESULT


def claimed(lease_ms: int) -> tuple[MemoryKeyStore, str, int]:
    """A store holding REF claimed: the store, the owner token and the claim's fence."""
    store, owner = MemoryKeyStore(), new_owner_token()
    claim = store.claim(REF, task_id="t1", owner=owner, fingerprint="fp", task_name="n",
                        lease_ms=lease_ms, ttl_ms=60_000)
    return store, owner, claim.fence


def test_owner_tokens_name_the_process() -> None:
    token = new_owner_token()
    assert token.startswith(owner_prefix(os.getpid())) and token != new_owner_token()


def test_a_held_lease_is_renewed_past_its_original_expiry() -> None:
    store, owner, fence = claimed(300)
    keeper = LeaseKeeper()
    token = keeper.hold(store, REF, owner, 300, fence=fence)
    time.sleep(0.6)  # twice the lease: without renewals another claim would take over
    record = store.get(REF)
    assert record is not None and record.lease_expires_ms is not None
    assert record.lease_expires_ms > store.now_ms()
    assert keeper.release(token) is True and keeper.held_count() == 0


def test_a_lease_taken_over_is_reported_lost(caplog: pytest.LogCaptureFixture) -> None:
    store, owner, fence = claimed(300)
    keeper = LeaseKeeper()
    token = keeper.hold(store, REF, owner, 300, fence=fence)
    store.discard(REF, owner=owner)  # gone: e.g. released by an operator
    store.claim(REF, task_id="t2", owner="other", fingerprint="fp", task_name="n",
                lease_ms=60_000, ttl_ms=60_000)
    with caplog.at_level(logging.ERROR, logger="celery_idempotency"):
        time.sleep(0.25)
    assert keeper.release(token) is False
    assert "was lost while its task ran" in caplog.text


def test_a_renewal_racing_the_tasks_own_outcome_is_not_a_loss(
        caplog: pytest.LogCaptureFixture) -> None:
    store, owner, fence = claimed(300)
    real_renew = store.renew

    def renew_after_the_task_completed(ref: RecordRef, **kwargs: Any) -> bool:
        # The task's outcome write lands between the keeper picking the lease and renewing it.
        store.complete(ref, owner=owner, fence=fence, result=RESULT, ttl_ms=60_000)
        return real_renew(ref, **kwargs)

    store.renew = renew_after_the_task_completed  # type: ignore[method-assign]
    keeper = LeaseKeeper()
    token = keeper.hold(store, REF, owner, 300, fence=fence)
    with caplog.at_level(logging.ERROR, logger="celery_idempotency"):
        time.sleep(0.25)
    assert keeper.release(token) is True
    assert "was lost" not in caplog.text
    assert store.get(REF).state is KeyState.SUCCEEDED  # type: ignore[union-attr]


def test_a_short_task_costs_no_store_call() -> None:
    store, owner, fence = claimed(60_000)
    calls: list[Any] = []
    real_renew = store.renew
    store.renew = lambda *a, **k: calls.append(a) or real_renew(*a, **k)  # type: ignore
    keeper = LeaseKeeper()
    token = keeper.hold(store, REF, owner, 60_000, fence=fence)
    time.sleep(0.05)
    keeper.release(token)
    assert calls == []
