"""Output: records as JSON objects and table rows, streaming tables, the `show` and `stats`
reports. Times in JSON are ISO 8601 UTC strings plus ``*_s`` numbers relative to the store's
clock; human output says "3m12s ago"."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import IO, Any

import click

from ..exceptions import CorruptRecord, ResultNotStored
from ..outcomes import decode_result
from ..records import JSON_CONTENT_TYPE, KeyState, Record, ResultStatus
from ..store import Entry
from .durations import format_duration
from .terminal import json_safe, safe_text, shown

TABLE_COLUMNS = ("STATE", "AGE", "LEASE", "TTL", "TASK ID", "SCOPE", "KEY")
_WIDTH_ROWS = 100  # rows buffered to size the table's columns: constant memory


def iso(ms: int | None) -> str | None:
    if not ms:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seconds(ms: int | None) -> float | None:
    return None if ms is None else round(ms / 1000, 3)


def printable(text: str) -> str:
    """Keys come from clients: never let one move the cursor or clear the terminal."""
    return shown(text)


def lease_text(record: Record, now_ms: int) -> str:
    if record.state is not KeyState.STARTED:
        return "-"
    left = (record.lease_expires_ms or 0) - now_ms
    return f"in {format_duration(left)}" if left > 0 else f"STALE {format_duration(left)} ago"


def ttl_text(ttl_ms: int | None) -> str:
    return "none" if ttl_ms is None else format_duration(ttl_ms)


def summary(entry: Entry, now_ms: int) -> dict[str, Any]:
    """A record as one JSON object (`list --json`; `show --json` adds the rest)."""
    record = entry.record
    assert record is not None
    lease_left = (None if record.state is not KeyState.STARTED or record.lease_expires_ms is None
                  else record.lease_expires_ms - now_ms)
    return {
        "key": record.key,
        "scope": record.scope,
        "state": record.state.value,
        "stale": record.lease_expired(now_ms),
        "task_id": record.task_id,
        "task_name": record.task_name or None,
        "created": iso(record.created_ms),
        "updated": iso(record.updated_ms),
        # A succeeded record keeps no creation time ("created": null): its age counts from
        # its completion ("updated").
        "age_s": seconds(now_ms - record.since_ms) if record.since_ms else None,
        "lease_expires": iso(record.lease_expires_ms) if lease_left is not None else None,
        "lease_left_s": seconds(lease_left),
        "ttl_s": seconds(entry.ttl_ms),
        "fence": record.fence,
        "retryable": record.retryable if record.state is KeyState.FAILED else None,
        "store_key": record.store_key,
    }


def row(entry: Entry, now_ms: int) -> tuple[str, ...]:
    record = entry.record
    assert record is not None
    age = format_duration(now_ms - record.since_ms) if record.since_ms else "?"
    return (record.state.value, age, lease_text(record, now_ms), ttl_text(entry.ttl_ms),
            shown(record.task_id), shown(record.scope), shown(record.key))


class Table:
    """A table streamed row by row: columns sized on the first rows, later wider cells overflow.
    The last column (the key, of any length) is not padded."""

    def __init__(self, columns: Sequence[str], out: IO[str] | None = None) -> None:
        self.columns = tuple(columns)
        self.out = out
        self._pending: list[tuple[str, ...]] | None = []
        self._widths: list[int] = []
        self.rows = 0

    def add(self, cells: tuple[str, ...]) -> None:
        self.rows += 1
        if self._pending is not None:
            self._pending.append(cells)
            if len(self._pending) >= _WIDTH_ROWS:
                self._flush()
        else:
            self._write(cells)

    def close(self) -> None:
        if self._pending is not None and self._pending:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending or [], None
        self._widths = [max(len(cells[i]) for cells in [self.columns, *pending])
                        for i in range(len(self.columns))]
        self._write(self.columns)
        for cells in pending:
            self._write(cells)

    def _write(self, cells: tuple[str, ...]) -> None:
        padded = [cell.ljust(width) for cell, width in zip(cells[:-1], self._widths, strict=False)]
        click.echo(safe_text("  ".join([*padded, cells[-1]])), file=self.out)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def json_line(document: Any) -> str:
    """One line of JSON: raw data, every non-printable character escaped (see terminal)."""
    return json_safe(json.dumps(document, ensure_ascii=False, separators=(",", ":")))


def json_document(document: Any) -> str:
    return json_safe(json.dumps(document, ensure_ascii=False, indent=2))


# -- show ----------------------------------------------------------------------------------------

def result_of(record: Record) -> tuple[Any, str | None]:
    """(decoded result, note). Only JSON is decoded: another serializer (pickle) could run code
    chosen by whoever wrote the record, so the CLI says what it is instead."""
    if record.state is not KeyState.SUCCEEDED:
        return None, None
    if record.result_status is not ResultStatus.STORED:
        return None, f"not cached: {record.result_status.value}"
    if record.content_type != JSON_CONTENT_TYPE:
        return None, (f"{record.content_type}, {len(record.result or b'')} bytes, not decoded "
                      "(the CLI decodes JSON results only)")
    try:
        return decode_result(record, accept=[JSON_CONTENT_TYPE]), None
    except (CorruptRecord, ResultNotStored) as exc:
        return None, f"undecodable: {exc.message}"


def details(entry: Entry, now_ms: int) -> dict[str, Any]:
    """The whole record as one JSON object (`show --json`)."""
    record = entry.record
    assert record is not None
    result, note = result_of(record)
    document = summary(entry, now_ms)
    document.update({
        "fingerprint": record.fingerprint,
        "owner": record.owner,
        "result_status": record.result_status.value if record.state is KeyState.SUCCEEDED
        else None,
        "content_type": record.content_type if record.state is KeyState.SUCCEEDED else None,
        "result": result,
        "result_note": note,
        "error": dict(record.error) if record.error is not None else None,
        # Names of the recorded recovery points (IdempotentTask.step), not their values.
        "steps": list(record.steps),
    })
    return document


def ago(ms: int | None, now_ms: int) -> str:
    if not ms:
        return "-"
    delta = now_ms - ms
    relative = f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(delta)}"
    return f"{iso(ms)} ({relative})"


def since_text(record: Record, now_ms: int) -> str:
    """"created <when>", or for a succeeded record (which keeps no creation time) "succeeded
    <when>"."""
    what = "created" if record.created_ms is not None else "succeeded"
    return f"{what} {ago(record.since_ms, now_ms)}"


def show_text(entry: Entry, now_ms: int) -> str:
    record = entry.record
    assert record is not None
    lines: list[tuple[str, str]] = [
        ("key", shown(record.key)),
        ("scope", shown(record.scope)),
        ("state", record.state.value),
    ]
    if record.state is KeyState.STARTED:
        if record.lease_expired(now_ms):
            lease = (f"STALE: expired {ago(record.lease_expires_ms, now_ms)}; no live worker "
                     "owns it (`release` frees the key)")
        else:
            lease = f"alive until {ago(record.lease_expires_ms, now_ms)}"
        lines.append(("lease", lease))
    lines += [
        ("task id", shown(record.task_id)),
        ("task name", shown(record.task_name) or "-"),
        ("owner", shown(record.owner or "-")),
        ("fence", str(record.fence)),
        ("fingerprint", shown(record.fingerprint)),
        ("created", ago(record.created_ms, now_ms) if record.created_ms is not None
         else "- (not kept once succeeded)"),
        ("updated", ago(record.updated_ms, now_ms)),
        ("ttl", ttl_text(entry.ttl_ms)),
    ]
    if record.state is KeyState.SUCCEEDED:
        result, note = result_of(record)
        text = (shown(note) if note is not None
                else json_safe(json.dumps(result, ensure_ascii=False, indent=2)))
        lines.append(("result", text.replace("\n", "\n" + " " * 13)))
    if record.error is not None:
        error = record.error
        lines.append(("error", f"{shown(str(error.get('type', '?')))}: "
                               f"{shown(str(error.get('message', '')))}"))
        lines.append(("retryable", "yes (the next publish runs the task again)"
                      if record.retryable else "no (replayed to every duplicate)"))
    if record.steps:  # recovery points recorded by a run that may go on (IdempotentTask.step)
        lines.append(("steps", ", ".join(shown(step) for step in record.steps)))
    lines.append(("store key", shown(record.store_key)))
    return safe_text("\n".join(f"{label + ':':<13}{value}" for label, value in lines))


# -- stats ---------------------------------------------------------------------------------------

def size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover
