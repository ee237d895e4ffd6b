"""Durations as `purge --older-than` reads them and as tables print them."""

from __future__ import annotations

import pytest

from celery_idempotency.cli.durations import format_duration, parse_duration


@pytest.mark.parametrize(("text", "ms"), [
    ("30s", 30_000), ("10m", 600_000), ("2h", 7_200_000), ("7d", 604_800_000),
    ("2w", 1_209_600_000), ("250ms", 250), ("1h30m", 5_400_000), ("1.5h", 5_400_000),
    (" 2D ", 172_800_000), ("0s", 0),
])
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["30", "", "s", "-5m", "7 days", "1y", "1h-30m", "m5"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("ms", "text"), [
    (0, "0ms"), (850, "850ms"), (42_000, "42s"), (252_000, "4m12s"), (3_600_000, "1h"),
    (3_661_000, "1h1m"), (86_400_000, "1d"), (273_600_000, "3d4h"), (-252_000, "4m12s"),
])
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
