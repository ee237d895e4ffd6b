"""conftest.py of one run of Celery's integration suite (copied beside the extracted ``t/``).

Not imported by the project's own test run: `celery_suite.py` copies it into the run directory.
It sets the app's task class to `IdempotentTask` when ``COMPAT_MODE=idempotent``, empties the
idempotency store before each test (so that one test's derived keys cannot deduplicate
another's), bounds each test's time and writes every test's outcome to ``COMPAT_REPORT``.
"""

import json
import os

import pytest
import redis

IDEMPOTENT = os.environ.get("COMPAT_MODE") == "idempotent"
STORE_URL = os.environ.get("COMPAT_STORE_URL", "")
TIMEOUT = float(os.environ.get("COMPAT_TIMEOUT", "180"))

_outcomes: dict[str, str] = {}


if IDEMPOTENT:
    @pytest.fixture(scope="session")
    def celery_parameters():
        return {"task_cls": "celery_idempotency:IdempotentTask"}

    @pytest.fixture(autouse=True)
    def _empty_idempotency_store():
        client = redis.Redis.from_url(STORE_URL)
        client.flushdb()
        client.close()
        yield


def pytest_collection_modifyitems(items):
    # Celery marks some tests with a 300 s timeout; a hang here is a finding, not a slow test.
    for item in items:
        item.add_marker(pytest.mark.timeout(TIMEOUT), append=False)


def pytest_runtest_logreport(report):
    name = report.nodeid.removeprefix("t/integration/")
    if report.failed:
        _outcomes[name] = "failed"
    elif report.skipped and name not in _outcomes:
        _outcomes[name] = "skipped"
    elif report.when == "call" and report.passed:
        _outcomes.setdefault(name, "passed")


def pytest_sessionfinish(session):
    path = os.environ.get("COMPAT_REPORT")
    if path:
        with open(path, "w") as file:
            json.dump(_outcomes, file, indent=1, sort_keys=True)
