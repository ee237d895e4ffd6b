"""Durations on the command line (``30s``, ``10m``, ``2h``, ``7d``, ``1h30m``) and in output."""

from __future__ import annotations

import re
from typing import Any

import click

_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000,
             "w": 604_800_000}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


def parse_duration(text: str) -> int:
    """``"7d"`` -> milliseconds. A unit is required: a bare ``30`` is ambiguous."""
    compact = text.strip().lower().replace(" ", "")
    if not _WHOLE.fullmatch(compact):
        raise ValueError(f"{text!r} is not a duration; use a number and a unit, e.g. 30s, 10m, "
                         "2h, 7d, 2w or 1h30m")
    return int(sum(float(number) * _UNITS_MS[unit] for number, unit in _PART.findall(compact)))


def format_duration(ms: int | float) -> str:
    """Compact and approximate, two units at most: ``850ms``, ``42s``, ``4m12s``, ``3d4h``."""
    ms = abs(int(ms))
    if ms < 1_000:
        return f"{ms}ms"
    seconds = ms // 1_000
    parts: list[str] = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if seconds >= size or parts:
            count, seconds = divmod(seconds, size)
            parts.append(f"{count}{unit}")
        if len(parts) == 2:
            break
    if len(parts) == 2 and parts[1][0] == "0":
        parts.pop()
    return "".join(parts)


def duration_option(ctx: click.Context, param: click.Parameter, value: Any) -> int | None:
    """Click callback: an option's text as a duration in milliseconds (a usage error if not)."""
    if value is None:
        return None
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
