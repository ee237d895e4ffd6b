"""``python -m benchmarks [--quick] [--sections ...] [--update-docs]`` (what ``make bench`` runs).

Starts its own redis-servers and celery workers, uses a queue of its own on the shared RabbitMQ
(deleted afterwards), prints the tables, writes ``benchmarks/results/latest.json`` and the chart
``benchmarks/results/latest.png``; ``--update-docs`` also rewrites the results block of
``docs/benchmarks.md`` and ``docs/benchmarks.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import machine, report
from .services import (
    RABBITMQ_URL,
    ROOT,
    ServiceMissing,
    rabbitmq_available,
    rabbitmq_version,
)

SECTIONS = ("throughput", "work", "duplicates", "publish", "bulk", "roundtrips", "memory",
            "latency", "wakeups", "steps")
RESULTS = ROOT / "benchmarks" / "results"

FULL = {"tasks": 3000, "rounds": 5, "warmup": 300, "work_tasks": 1000, "work_rounds": 3,
        "work_ms": 2.0, "dup_tasks": 3000, "dup_rounds": 3,
        "dup_shares": [0.0, 0.1, 0.3, 0.5, 0.7], "publish_calls": 2000,
        "publish_rounds": 5, "bulk_calls": 10_000, "bulk_rounds": 3, "roundtrip_calls": 200,
        "memory_points": [100_000, 1_000_000],
        "memory_sample": 2_000, "latency_iterations": 5_000, "wakeup_iterations": 300,
        "wakeup_rounds": 10, "step_iterations": 1_000}
QUICK = {"tasks": 600, "rounds": 2, "warmup": 100, "work_tasks": 200, "work_rounds": 1,
         "work_ms": 2.0, "dup_tasks": 600, "dup_rounds": 1,
         "dup_shares": [0.0, 0.1, 0.3, 0.5, 0.7], "publish_calls": 500,
         "publish_rounds": 2, "bulk_calls": 2_000, "bulk_rounds": 1, "roundtrip_calls": 50,
         "memory_points": [20_000],
         "memory_sample": 500, "latency_iterations": 1_000, "wakeup_iterations": 100,
         "wakeup_rounds": 4, "step_iterations": 200}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds per configuration (smaller runs, fewer rounds)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--rounds", type=int, help="rounds of the throughput sections")
    parser.add_argument("--tasks", type=int, help="tasks per throughput run")
    parser.add_argument("--no-rabbitmq", action="store_true",
                        help="skip the RabbitMQ broker (Redis broker only)")
    parser.add_argument("--pools", default="solo,prefork", help="worker pools (solo,prefork)")
    parser.add_argument("--memory-points", help="record counts, e.g. 100000,1000000")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a solo worker (pyinstrument) through one run of "
                             "IdempotentTask calls; files next to --out")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the results block of docs/benchmarks.md and its chart")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.sections.split(","))) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    params: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.rounds:
        params["rounds"] = args.rounds
    if args.tasks:
        params["tasks"] = args.tasks
    if args.memory_points:
        params["memory_points"] = [int(x) for x in args.memory_points.split(",")]
    sections = [s for s in SECTIONS if s in args.sections.split(",")]
    pools = args.pools.split(",")
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s  {message}", flush=True)

    brokers = ["redis"]
    services: dict[str, str] = {}
    if not args.no_rabbitmq and {"throughput"} & set(sections):
        if rabbitmq_available():
            brokers.append("rabbitmq")
            services["rabbitmq"] = rabbitmq_version()
        else:
            log(f"RabbitMQ is not reachable at {RABBITMQ_URL}: Redis broker only")
    given = shlex.join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MAKELEVEL"):  # run by `make bench`
        command = "make bench" + (f" BENCH_ARGS={shlex.quote(given)}" if given else "")
    else:
        command = "python -m benchmarks" + (f" {given}" if given else "")
    results: dict[str, Any] = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
        "parameters": params,
        "services": services,
        "sections": {},
    }
    # Imported here: the app module imports the peers, which need the bench extra.
    from .stack import Stack

    log_dir = Path(tempfile.mkdtemp(prefix="idem-bench-logs-"))
    log(f"worker logs in {log_dir}")
    try:
        stack = Stack(log_dir)
    except ServiceMissing as exc:  # say so plainly (apt-get install redis-server)
        raise SystemExit(str(exc)) from None
    services["redis"] = stack.store.version()
    try:
        _run_sections(stack, sections, params, brokers, pools, results["sections"], log)
        if args.profile:
            from . import profile

            results["sections"]["profile"] = profile.profile_worker(
                stack, tasks=params["tasks"], out_dir=args.out.parent, log=log)
    finally:
        stack.close()
    results["runtime_s"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = machine.load_average()
    results["targets"] = report.targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    chart = report.chart(results, args.out.with_suffix(".png"))
    print()
    print("\n".join(report.machine_lines(results)))
    print("\n".join(report.tables(results)))
    print("\n".join(report.target_lines(results["targets"])))
    print(f"\nwrote {args.out}" + (f" and {chart}" if chart else ""))
    if args.update_docs:
        report.update_docs(results, chart)
        print(f"updated {report.DOCS} and {report.DOCS_CHART}")
    print(f"runtime {results['runtime_s']:.0f} s")
    return 0


def _run_sections(stack: Any, sections: list[str], params: dict[str, Any], brokers: list[str],
                  pools: list[str], out: dict[str, Any], log: Any) -> None:
    from . import bulk, latency, memory, publish, roundtrips, throughput, wakeups

    if "throughput" in sections:
        out["throughput"] = throughput.unique_throughput(
            stack, brokers=brokers, pools=pools, tasks=params["tasks"],
            rounds=params["rounds"], warmup=params["warmup"], log=log)
    if "work" in sections:
        out["work"] = throughput.unique_throughput(
            stack, brokers=["redis"], pools=["solo"], tasks=params["work_tasks"],
            rounds=params["work_rounds"], warmup=params["warmup"] // 3, log=log,
            work_ms=params["work_ms"], configs=throughput.CONFIGS)
    if "duplicates" in sections:
        out["duplicates"] = throughput.duplicate_workload(
            stack, broker="redis", pool="prefork", tasks=params["dup_tasks"],
            fractions=params["dup_shares"], rounds=params["dup_rounds"], warmup=params["warmup"],
            log=log)
    if "publish" in sections:
        out["publish"] = publish.publish_path(stack, calls=params["publish_calls"],
                                              rounds=params["publish_rounds"], log=log)
    if "bulk" in sections:
        out["bulk"] = bulk.bulk_publish(stack, calls=params["bulk_calls"], duplicate_share=0.3,
                                        rounds=params["bulk_rounds"], log=log)
    if "roundtrips" in sections:
        out["roundtrips"] = roundtrips.round_trips(stack, calls=params["roundtrip_calls"],
                                                   log=log)
    if "latency" in sections:
        out["latency"] = latency.worker_latency(stack, iterations=params["latency_iterations"],
                                                log=log)
    if "wakeups" in sections:
        out["wakeups"] = wakeups.wakeups(stack, iterations=params["wakeup_iterations"],
                                         rounds=params["wakeup_rounds"], log=log)
    if "steps" in sections:
        from . import steps

        out["steps"] = steps.step_cost(stack, iterations=params["step_iterations"], log=log)
    if "throughput" in sections and "latency" not in sections:
        # Target 1 is reported with the worker-side decomposition of its gap (library Python,
        # script work, bare round trips): measure a shorter one when the latency section is off.
        log("[throughput] worker-side breakdown (short latency decomposition)")
        out["throughput"]["breakdown"] = latency.worker_latency(
            stack, iterations=max(500, params["latency_iterations"] // 5), log=log)
    if "memory" in sections:
        out["memory"] = memory.memory_per_record(checkpoints=params["memory_points"],
                                                 sample=params["memory_sample"], log=log)


if __name__ == "__main__":
    raise SystemExit(main())
