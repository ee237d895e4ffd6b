"""``python -m benchmarks --profile``: where a worker running `IdempotentTask` spends its time,
to explain a missed throughput target.

py-spy cannot attach to a process on every machine (it fails in some containers), so the
profiler runs inside the worker: a solo worker on the Redis broker started with
``BENCH_PROFILE`` runs pyinstrument on its main thread (where the solo pool runs tasks) from
``worker_ready`` to its warm shutdown (benchmarks/app.py). The benchmark publishes one run of
unique `IdempotentTask` calls to it and stops it; at its shutdown the worker writes, next to the
results JSON (benchmarks/results/ by default), ``profile-idempotent.txt`` (the call tree) and
``profile-idempotent.json`` (seconds in the library, in its store calls, in the task body, in
socket I/O), which goes into the results JSON per task. pyinstrument's own overhead inflates
Python time: read the shares, not the absolute times.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import app as bench_app
from .stack import Stack
from .throughput import _run

LIBRARY = "celery_idempotency"
STORE = f"{LIBRARY}/store"


def _walk(frame: Any, inside: frozenset[str], totals: dict[str, float]) -> None:
    """Inclusive time per group, counting only the outermost frame of each group on a path
    (so recursion and nested calls are not counted twice)."""
    path = frame.file_path or ""
    groups = set()
    if LIBRARY in path and "/tests/" not in path:
        groups.add("celery_idempotency (all, store calls included)")
        if STORE in path:
            groups.add("celery_idempotency store calls (scripts, round trips)")
    if path.endswith("benchmarks/app.py") and frame.function == "record_effect":
        groups.add("task body: side-effect round trip")
    if frame.function in ("recv_into", "sendall", "send", "recv", "read_response") \
            or "hiredis" in path:
        groups.add("socket I/O, waiting for messages included (any client)")
    for group in groups - inside:
        totals[group] += frame.time
    for child in frame.children:
        _walk(child, inside | groups, totals)


def summarise(session: Any) -> dict[str, Any]:
    """Seconds per group of the profiled worker (run in the worker, at its shutdown)."""
    root = session.root_frame()
    totals: dict[str, float] = defaultdict(float)
    if root is not None:
        _walk(root, frozenset(), totals)
    return {"profiled_s": session.duration, "samples": session.sample_count,
            "seconds": dict(sorted(totals.items()))}


def profile_worker(stack: Stack, *, tasks: int, out_dir: Path, log: Any) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / "profile-idempotent"
    for suffix in (".txt", ".json"):
        base.with_suffix(suffix).unlink(missing_ok=True)
    log(f"[profile] solo worker under pyinstrument, {tasks} IdempotentTask calls")
    with stack.worker("redis", "solo", env={bench_app.ENV_PROFILE: str(base)}) as worker:
        stack.flush_stores()
        result = _run(stack, "idempotent", list(range(tasks)), worker)
    # Worker.stop waited for the warm shutdown, which wrote the call tree and the summary.
    if not base.with_suffix(".json").exists():
        log("[profile] no profile written (see the worker log)")
        return {"error": "no profile written (see the worker log)"}
    summary = json.loads(base.with_suffix(".json").read_text())
    profiled = summary["profiled_s"]
    data = {
        "tasks": tasks, "tasks_per_s_while_profiled": result.rate,
        "profiled_s": profiled, "samples": summary["samples"],
        "call_tree": _shown(base.with_suffix(".txt")),
        "share_of_profiled_time": {group: value / profiled
                                   for group, value in summary["seconds"].items()},
        "per_task_us": {group: value / tasks * 1e6
                        for group, value in summary["seconds"].items()},
    }
    log("[profile] " + "; ".join(f"{group} {value:.0f} µs/task"
                                 for group, value in data["per_task_us"].items())
        + f" (call tree in {base.with_suffix('.txt')})")
    return data


def _shown(path: Path) -> str:
    from .services import ROOT

    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def table(data: dict[str, Any]) -> list[str]:
    if "error" in data:
        return ["", f"**Profile**: {data['error']}."]
    lines = ["", f"**Profile** (pyinstrument in a solo worker, Redis broker, {data['tasks']} "
             f"IdempotentTask calls, {data['tasks_per_s_while_profiled']:.0f} tasks/s while "
             f"profiled, which inflates Python time; call tree: {data['call_tree']}).", "",
             "| where | µs per task | share of profiled time |", "|---|---:|---:|"]
    for group, value in data["per_task_us"].items():
        lines.append(f"| {group} | {value:.0f} | {data['share_of_profiled_time'][group]:.0%} |")
    return lines
