"""The unit tests' eager app: tasks run in the test's own process on the memory store."""

from __future__ import annotations

import pytest
from celery import Celery

from tests.support.apps import eager_app


@pytest.fixture
def app() -> Celery:
    """A fresh eager app per test; a task's exception propagates out of ``apply()``."""
    return eager_app("eager", propagate=True)
