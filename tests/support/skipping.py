"""The test suite's policy for missing services (the only pytest-aware module here): skip
locally; fail under CI=true, where a skipped integration test would hide a broken setup.

tests/conftest.py applies it to every `ServiceMissing` a test or fixture raises."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = bool(os.environ.get("CI"))


def missing_service(reason: str) -> NoReturn:
    """Skip locally; fail in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: required services must be available)")
    pytest.skip(reason)
