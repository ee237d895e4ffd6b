"""Publishing for the chaos suite, shared by the test process and the second publisher process.

A schedule is a list of ``(offset_s, key, sleep_ms, how)``: at ``start + offset_s`` (wall
clock, so that two processes agree) publish ``work(key, sleep_ms)`` with ``idempotency_key=key``,
either through ``apply_async`` (``how="apply"``: deduplicated at publish) or by name with the
key header, as a service that does not import the task would (``how="by_name"``:
``app.send_task``, always sent, deduplicated at execution). A publish that meets an unreachable
store (``StoreUnavailable``: fail closed) is tried again, as a client would, with a fresh
``apply_async`` call.

Run as a program (the second publisher process), configured from the CHAOS_* environment:

    python -m tests.chaos.publisher SCHEDULE.json OUT.json

SCHEDULE.json: ``{"start": wall_time, "threads": n, "get_deadline": wall_time,
"entries": [[offset_s, key, sleep_ms, how], ...]}``. After publishing, it waits for every
handle's ``get()`` (until ``get_deadline``; for a message sent by name, the handle
``result_for_key`` gives) and writes one JSON object per publish to OUT.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_idempotency import IdempotentResult, StoreUnavailable

Entry = tuple[float, str, int, str]
RETRY_PAUSE = 0.05
GIVE_UP_AFTER = 60.0  # the store is down for well under a second at a time


@dataclass
class Published:
    key: str
    handle: IdempotentResult | None  # None: sent by name (see handle_for)
    attempts: int  # 1 + publishes refused by an unreachable store
    at: float
    task_id: str


def publish(key: str, sleep_ms: int, how: str) -> tuple[IdempotentResult | None, str, int]:
    from tests.chaos.chaos_app import app, work

    if how == "by_name":
        sent = app.send_task(work.name, args=(key, sleep_ms),
                             headers={"idempotency_key": key})
        return None, sent.id, 1
    attempts = 0
    deadline = time.monotonic() + GIVE_UP_AFTER
    while True:
        attempts += 1
        try:
            handle = work.apply_async((key, sleep_ms), idempotency_key=key)
            return handle, handle.id, attempts
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE)


def run_schedule(per_thread: list[list[Entry]], *, start: float) -> list[Published]:
    """Publish each list of entries from a thread of its own, each entry at its time. Returns
    what was published, in no particular order."""
    out: list[Published] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def publisher(mine: list[Entry]) -> None:
        try:
            for offset, key, sleep_ms, how in sorted(mine):
                pause = start + offset - time.time()
                if pause > 0:
                    time.sleep(pause)
                handle, task_id, attempts = publish(key, sleep_ms, how)
                with lock:
                    out.append(Published(key, handle, attempts, time.time(), task_id))
        except BaseException as exc:
            errors.append(exc)
            raise

    workers = [threading.Thread(target=publisher, args=(mine,), name=f"publisher-{i}")
               for i, mine in enumerate(per_thread)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return out


def handle_for(item: Published, *, deadline: float) -> IdempotentResult:
    """The publish's own handle, or for a message sent by name the key's handle rebuilt from
    the key alone (as a result endpoint would), once the key has a record."""
    from tests.chaos.chaos_app import work

    if item.handle is not None:
        return item.handle
    while True:
        with contextlib.suppress(StoreUnavailable):
            handle = work.result_for_key(item.key)
            if handle is not None:
                return handle
        if time.time() > deadline:
            raise CeleryTimeoutError(f"key {item.key!r} never got a record")
        time.sleep(0.1)


def get(handle: IdempotentResult, *, deadline: float) -> Any:
    """``handle.get()``, looking again while the store is away (it is restarted on purpose)."""
    while True:
        try:
            return handle.get(timeout=max(0.1, deadline - time.time()))
        except StoreUnavailable:
            if time.time() > deadline:
                raise
            time.sleep(RETRY_PAUSE)


def collect(published: list[Published], *, deadline: float) -> list[dict[str, Any]]:
    """Each handle's ``get()`` until ``deadline`` (wall clock), as JSON-able rows."""
    rows = []
    for item in published:
        row: dict[str, Any] = {"key": item.key, "id": item.task_id, "by_name": not item.handle,
                               "duplicate": bool(item.handle and item.handle.duplicate),
                               "attempts": item.attempts}
        try:
            handle = handle_for(item, deadline=deadline)
            row["result"] = get(handle, deadline=deadline)
        except CeleryTimeoutError as exc:
            row["error"] = f"timeout: {exc}"
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    schedule_path, out_path = argv
    with open(schedule_path) as f:
        schedule = json.load(f)
    entries = [(float(t), str(k), int(s), str(h)) for t, k, s, h in schedule["entries"]]
    threads = int(schedule["threads"])
    published = run_schedule([entries[i::threads] for i in range(threads)],
                             start=schedule["start"])
    rows = collect(published, deadline=schedule["get_deadline"])
    with open(out_path + ".tmp", "w") as f:
        json.dump(rows, f)
    os.replace(out_path + ".tmp", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
