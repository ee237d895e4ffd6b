"""``python -m benchmarks.instructions [--n 200]``: the library's cost per task in CPU
instructions, counted by valgrind's callgrind: repeatable to a fraction of a percent on a
noisy machine, where timings (`benchmarks.latency`) move by more than the differences sought.

One process under ``valgrind --tool=callgrind`` runs, after a warm-up outside the count, ``n``
calls of each case below, each block through a ctypes callback: callgrind collects only inside
``ffi_call`` (``--toggle-collect``) and writes one profile per block (``--dump-after``), so
interpreter start-up and imports are never counted. The cases, on the benchmark's task
(`benchmarks.app`), in this process, with a kombu ``memory://`` broker (publishing is then
in-process too):

* publish: ``apply_async`` of the plain task, of the `IdempotentTask` with its store call
  (``reserve``) replaced by a constant reply ("store free": the library's own Python), and with
  the real call to a private redis-server (adds redis-py and the script's arguments and reply);
* worker: ``Task.apply()`` (Celery's tracer, as a worker runs a message) of the plain task, of
  the same task on a base class that only overrides ``__call__`` (what hooking ``__call__``
  costs in Celery by itself), and of the `IdempotentTask` with the headers a published message
  carries, ``claim``/``complete`` free, then real.

Instructions of another process (redis-server) are not counted; a round trip's wait costs
none. ``--annotate`` prints ``callgrind_annotate --inclusive=yes`` of the plain and "store free"
blocks (the hot C functions, e.g. the garbage collector; use cProfile for a Python view).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASES = ("publish plain", "publish plain + 1 PING", "publish idempotent, store free",
         "publish idempotent", "worker plain", "worker plain + 2 PING",
         "worker plain, __call__ overridden", "worker idempotent, store free",
         "worker idempotent")
_CHILD = "--child"


Block = Callable[[], Callable[[], None]]  # prepares (not counted), returns what is counted


def _run(blocks: list[Block], *, collected: bool) -> None:
    """Run each block; ``collected``: inside ``ffi_call`` (collected and dumped by callgrind)."""
    callback_type = ctypes.CFUNCTYPE(None)
    for prepare in blocks:
        counted = prepare()
        if collected:
            callback_type(counted)()
        else:
            counted()


def child(n: int, store_url: str, effects_url: str) -> None:
    os.environ.update({"BENCH_EFFECTS_URL": effects_url})
    from celery import Task

    from celery_idempotency.config import FINGERPRINT_HEADER
    from celery_idempotency.store import ClaimStatus, RedisKeyStore, ReserveStatus
    from celery_idempotency.store.base import Claim, Reservation

    from . import app as bench_app

    bench_app.configure(broker_url="memory://", store_url=store_url, once_url=store_url,
                        singleton_url=store_url, queue="idem-instructions",
                        remote_control=False)
    plain, idem = bench_app.plain, bench_app.idem

    class CallOverridden(Task):  # type: ignore[misc]
        # What overriding __call__ costs by itself: Celery's tracer then calls the task
        # object (pushing a request of its own) instead of its run() (IdempotentTask must).
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return super().__call__(*args, **kwargs)

    overridden = bench_app.bench_task("bench.call-overridden", CallOverridden)
    run = uuid.uuid4().hex[:8]
    counter = [0]
    real = RedisKeyStore.reserve, RedisKeyStore.claim, RedisKeyStore.complete

    def free(on: bool) -> None:
        if not on:
            RedisKeyStore.reserve, RedisKeyStore.claim, RedisKeyStore.complete = real  # type: ignore[method-assign]
            return
        reserved = Reservation(ReserveStatus.RESERVED)
        claimed = Claim(ClaimStatus.CLAIMED, fence=1)
        RedisKeyStore.reserve = lambda self, ref, **_: reserved  # type: ignore[method-assign]
        RedisKeyStore.claim = lambda self, ref, **_: claimed  # type: ignore[method-assign]
        RedisKeyStore.complete = lambda self, ref, **_: []  # type: ignore[method-assign]  # nothing parked

    ping = idem.idem_store().client.ping  # the store's own client: a bare round trip

    def publish(task: Any, store_free: bool, pings: int = 0) -> Block:
        def prepare() -> Callable[[], None]:
            calls = []
            for _ in range(n):
                counter[0] += 1
                calls.append((run, counter[0]))

            def counted() -> None:
                free(store_free)
                try:
                    for args in calls:
                        task.apply_async(args)
                        for _ in range(pings):
                            ping()
                finally:
                    free(False)
            return counted
        return prepare

    def execute(task: Any, store_free: bool, pings: int = 0) -> Block:
        def prepare() -> Callable[[], None]:
            calls = []
            for _ in range(n):
                counter[0] += 1
                args = (run, counter[0])
                headers: dict[str, Any] = {}
                if task is idem:  # what apply_async stamps on a published message
                    headers = bench_app.published_headers(idem, f"instr-{run}-{counter[0]}",
                                                          args)
                    if not store_free:  # a pending record, as a publisher leaves it
                        ref = idem.key_target_of_message(args, {}, headers).ref
                        idem.idem_store().reserve(
                            ref, task_id=f"t-{counter[0]}",
                            fingerprint=headers[FINGERPRINT_HEADER], task_name=idem.name,
                            ttl_ms=60_000)
                calls.append((args, headers))

            def counted() -> None:
                free(store_free)
                try:
                    for args, headers in calls:
                        outcome = task.apply(args, headers=headers)
                        for _ in range(pings):
                            ping()
                        if outcome.state != "SUCCESS":
                            raise RuntimeError(f"{outcome.state} {outcome.traceback}")
                finally:
                    free(False)
            return counted
        return prepare

    blocks = [publish(plain, False), publish(plain, False, pings=1), publish(idem, True),
              publish(idem, False), execute(plain, False), execute(plain, False, pings=2),
              execute(overridden, False), execute(idem, True), execute(idem, False)]
    _run(blocks, collected=False)  # warm-up: first-use caches, imports, connections
    _run(blocks, collected=True)


def _totals(out: Path) -> list[int]:
    """The collected instructions of each dump, in order (the dump at exit collects none)."""
    dumps = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.suffix[1:]))
    totals = []
    for dump in dumps:
        for line in dump.read_text().splitlines():
            if line.startswith("totals:") or line.startswith("summary:"):
                totals.append(int(line.split()[1]))
                break
    return totals


def measure(n: int, *, annotate: bool = False) -> dict[str, Any]:
    from .services import ROOT, RedisServer

    server = RedisServer(name="instructions").start()
    tmp = Path(tempfile.mkdtemp(prefix="idem-callgrind-"))
    out = tmp / "callgrind.out"
    try:
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=ffi_call",
             "--dump-after=ffi_call", f"--callgrind-out-file={out}", sys.executable, "-m",
             "benchmarks.instructions", _CHILD, str(n), server.url(0), server.url(1)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        totals = [t for t in _totals(out) if t > 0]
        if len(totals) != len(CASES):
            raise RuntimeError(f"expected {len(CASES)} collected blocks, got {totals}")
        per_task = {case: total / n for case, total in zip(CASES, totals, strict=True)}
        if annotate:
            dumps = sorted(tmp.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
            collected = [d for d in dumps if _totals_of(d) > 0]
            for case, dump in zip(CASES, collected, strict=True):
                if not case.endswith(" idempotent"):
                    print(f"== {case}: {dump}")
                    print(subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dump)],
                                         check=True, capture_output=True, text=True).stdout[:5000])
    finally:
        server.stop()
        if not annotate:  # the profiles are only read for --annotate
            shutil.rmtree(tmp, ignore_errors=True)
    return per_task


def _totals_of(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == _CHILD:
        child(int(argv[1]), argv[2], argv[3])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="calls per measured block")
    parser.add_argument("--annotate", action="store_true",
                        help="print callgrind_annotate (inclusive) of the plain and 'store "
                        "free' blocks")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    per_task = measure(args.n, annotate=args.annotate)
    if args.json:
        print(json.dumps(per_task, indent=2))
        return 0
    print(f"instructions per task ({args.n} calls per case)")
    for case in CASES:
        print(f"  {case:36} {per_task[case]:>11,.0f}")
    for path, pings in (("publish", 1), ("worker", 2)):
        plain = per_task[f"{path} plain"]
        floor = per_task[f"{path} plain + {pings} PING"]
        free = per_task[f"{path} idempotent, store free"]
        real = per_task[f"{path} idempotent"]
        print(f"{path}: idempotent - plain {real - plain:>+10,.0f}; library Python (store free "
              f"- plain) {free - plain:>+10,.0f}; store calls (client side) {real - free:>+10,.0f}"
              f"; {pings} bare PING {floor - plain:>+10,.0f}; above plain + PING "
              f"{real - floor:>+10,.0f}")
    overridden = per_task["worker plain, __call__ overridden"] - per_task["worker plain"]
    print(f"worker: of the library Python, overriding __call__ alone {overridden:>+10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
