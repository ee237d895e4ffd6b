"""The chaos suite: real workers SIGKILLed and restarted, the key store restarted, thousands of
duplicate publishes (see tests/chaos/harness.py). Sizes from CHAOS_* variables; `make chaos`
runs the long configuration. Each run's one-line summary is shown in pytest's terminal summary
(with or without ``-s``) and appended to CHAOS_SUMMARY_FILE when that is set."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.harness import SUMMARIES


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: kills real workers at random moments")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/chaos/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.chaos)
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SUMMARIES:
        terminalreporter.section("chaos")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
