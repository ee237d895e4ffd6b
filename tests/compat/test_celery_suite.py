"""A subset of Celery's own integration suite, with `IdempotentTask` as the app's task class.

The subset is every test that found an incompatibility once (chains, ``self.replace()``,
``Reject``, revoke, retries, results Celery can store, arguments Celery accepts, the result
handle as Celery's ``AsyncResult``), plus our own checks (`idempotent_checks.py`). The three
modules in full, compared with plain Celery: ``python -m tests.compat.celery_suite``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.celery_suite import (
    EXPECTED_FAILURES,
    OWN_CHECKS,
    expected_reason,
    fetch_sdist,
    load_expected_failures,
    run_suite,
)
from tests.support.services import RedisServer
from tests.support.skipping import missing_service

SUBSET = (
    # 1. the last step of a chain (published with chain=[]) is part of the canvas
    "test_canvas.py::test_chord::test_chain_in_chain_with_args",
    "test_canvas.py::test_chord::test_chord_in_chain_with_args",
    "test_canvas.py::test_xmap_xstarmap::test_starmap_in_a_group_and_a_chain",
    "test_canvas.py::test_chain::test_chain_child_replaced_with_chain_first",
    "test_canvas.py::test_chain::test_chain_child_replaced_with_chain_middle",
    # 2. self.replace(): the replaced task id ends with an outcome
    "test_canvas.py::test_chain::test_task_replaced_with_chain",
    "test_canvas.py::test_chain::test_second_order_replace",
    "test_canvas.py::test_chain::test_replace_with_chain_that_contains_a_group",
    "test_canvas.py::test_chain::test_task_with_callback_replaced_with_chain",
    "test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_1",
    "test_tasks.py::test_task_replacement::test_replaced_task_nesting_increments",
    # 3. Reject(requeue=False)
    "test_tasks.py::test_tasks::test_reject_without_requeue_stores_failure",
    # 4. revoked: TaskRevokedError / REVOKED
    "test_tasks.py::test_tasks::test_revoked",
    # 5. a result Celery can store (a returned AsyncResult) is cached
    "test_canvas.py::test_chain::test_groupresult_serialization",
    # 6. arguments Celery accepts: bytes, pydantic models; a call that does not fit: TypeError
    "test_canvas.py::test_group::test_callback_called_by_group",
    "test_tasks.py::test_tasks::test_pydantic_model_arguments",
    "test_tasks.py::test_tasks::test_wrong_arguments",
    # 7. the handle is Celery's AsyncResult: RETRY, ignore_result, forget, subscriptions
    "test_tasks.py::test_tasks::test_retry",
    "test_tasks.py::test_tasks::test_retry_with_unpickleable_exception",
    "test_tasks.py::test_tasks::test_ignore_result",
    "test_tasks.py::test_task_redis_result_backend",
)


def test_the_subset_lists_no_expected_failure() -> None:
    expected = load_expected_failures()
    assert [name for name in SUBSET if expected_reason(name, expected)] == []


def test_expected_failures_each_give_a_reason() -> None:
    entries = load_expected_failures(EXPECTED_FAILURES)
    assert entries and all(len(reason) <= 100 for reason in entries.values())


@pytest.mark.integration
def test_celerys_integration_subset_passes_with_idempotent_task(tmp_path: Path) -> None:
    try:
        fetch_sdist()
    except Exception as exc:  # no network to the package index, or pip refused
        missing_service(f"cannot download Celery's sdist: {exc}")
    server = RedisServer().start()
    try:
        result = run_suite("idempotent", server.port, selection=(*SUBSET, OWN_CHECKS),
                           log_dir=tmp_path)
    finally:
        server.close()
    log = result.log.read_text()
    not_passed = {name: outcome for name, outcome in result.outcomes.items()
                  if outcome != "passed"}
    assert not_passed == {}, log[-6000:]
    never_ran = [name for name in (*SUBSET, OWN_CHECKS)
                 if not any(ran == name or ran.startswith((name + "::", name + "["))
                            for ran in result.outcomes)]
    assert never_ran == [], log[-3000:]
    assert result.returncode == 0, log[-3000:]
