"""Tables (terminal and Markdown), target checks, the chart and the docs block."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .services import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"
DOCS_CHART = ROOT / "docs" / "benchmarks.png"
BEGIN, END = "<!-- bench:results:begin -->", "<!-- bench:results:end -->"

# The targets of docs/benchmarks.md: checked and reported, never asserted.
# Unique tasks: against the floor of the design (plain Celery + three bare store round trips,
# benchmarks/app.py FloorTask), Redis broker, both pools.
MIN_RATIO_TO_FLOOR = 0.95
FLOOR_BLOCKS = ("redis/solo", "redis/prefork")
MIN_WORK_RATIO_TO_PLAIN = 0.93  # unique tasks with 2 ms of I/O (section 1b)
AHEAD_OF_PEERS_FROM = 0.10  # duplicate share from which IdempotentTask beats both peers
MAX_LATENCY_OVER_PING = 3.0
MIN_BULK_RATIO_TO_PLAIN = 1.0  # apply_many of keyed calls vs plain apply_async of the same
MIN_GROUP_RATIO_TO_PLAIN_GROUP = 1.0  # IdempotentGroup vs celery.group of the same members
MAX_BYTES_PER_RECORD = 360  # layout C of docs/benchmarks.md (300 needs a product decision)
MAX_ROUND_TRIPS = {"publish, new key": 1, "execute (first run)": 2,
                   "publish, duplicate while pending": 1,
                   "publish, duplicate after success": 1}
PEERS = ("celery-once", "celery-singleton")
BREAKDOWN = {  # latency.py's decomposition of the worker-side overhead, as the report names it
    "library Python (store calls free)": "library Python",
    "scripts above a bare round trip (real minus PING)": "script work above bare round trips",
    "two bare round trips (store calls = PING)": "bare round trips",
}


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def tables(results: dict[str, Any]) -> list[str]:
    """Every section as a Markdown table (also what the terminal shows)."""
    out: list[str] = []
    sections = results["sections"]
    if "throughput" in sections:
        data = sections["throughput"]
        out += ["", f"**1. Unique tasks**: end-to-end throughput (publish to last completion), "
                f"{data['tasks_per_run']} tasks per run, median of {data['rounds']} interleaved "
                "rounds; ratios to plain Celery in the same run.", ""]
        rows = []
        for label, configs in data["results"].items():
            if "stalled" in configs:
                rows.append([label, "stalled: worker stopped consuming (see notes)",
                             *["-"] * 7])
                continue
            idem = configs["idempotent"]["tasks_per_s"]
            floor = configs.get("floor")
            rows.append([
                label, f"{configs['plain']['tasks_per_s']:.0f}",
                _f(configs["idempotent"]["ratio_to_plain"]),
                _f(configs["celery-once"]["ratio_to_plain"]),
                _f(configs["celery-singleton"]["ratio_to_plain"]),
                _f(floor["ratio_to_plain"]) if floor else "-",
                _f(idem / floor["tasks_per_s"]) if floor else "-",
                _f(idem / configs["celery-once"]["tasks_per_s"]),
                _f(idem / configs["celery-singleton"]["tasks_per_s"]),
            ])
        out += _table(["broker/pool", "plain tasks/s", "IdempotentTask / plain",
                       "QueueOnce / plain", "Singleton / plain", "floor / plain",
                       "IdempotentTask / floor", "IdempotentTask / QueueOnce",
                       "IdempotentTask / Singleton"], rows)
        out += ["", "The floor is plain Celery plus three bare `PING`s to the store's "
                "redis-server where `IdempotentTask` makes its three store calls (one before "
                "publishing, one before and one after the body)."]
        breakdown = _breakdown(sections)
        if breakdown:
            out += ["", "Gap to the floor, per task: " + "; ".join(
                f"{label} {_gap_us(configs):.0f} µs end to end"
                for label, configs in data["results"].items()
                if "stalled" not in configs and "floor" in configs)
                + f". Worker side, in-process p50: {breakdown} (bare round trips: in the "
                "floor too)."]
    if "work" in sections:
        data = sections["work"]
        out += ["", f"**1b. Same, with {data['work_ms']} ms of I/O wait in the task body** "
                f"(redis/solo, {data['tasks_per_run']} tasks per run): what a task that does "
                "anything looks like.", ""]
        rows = []
        for label, configs in data["results"].items():
            if "stalled" in configs:
                continue
            rows.append([label, f"{configs['plain']['tasks_per_s']:.0f}"]
                        + [_f(configs[c]["ratio_to_plain"])
                           for c in ("idempotent", "celery-once", "celery-singleton")])
        out += _table(["broker/pool", "plain tasks/s", "IdempotentTask / plain",
                       "QueueOnce / plain", "Singleton / plain"], rows)
    if "duplicates" in sections:
        data = sections["duplicates"]
        out += ["", f"**2. Duplicate-heavy workload** ({data['broker']}/{data['pool']}): "
                "a share of the publishes repeats an earlier call (uniformly chosen among "
                "the calls so far); publishes per second end to end, and how often the side "
                "effect ran.", ""]
        rows = []
        for share, block in data["results"].items():
            for config, values in block["configs"].items():
                rows.append([
                    f"{share} of {block['publishes']}", config,
                    f"{values['publishes_per_s']:.0f}", _f(values["ratio_to_plain"]),
                    f"{values['executions']:.0f}", str(block["distinct_keys"]),
                    f"{values['extra_executions']:.0f}",
                    f"{values['keys_run_more_than_once']:.0f}",
                    f"{values['already_queued']:.0f}" if config == "celery-once" else "-",
                ])
        out += _table(["duplicates", "configuration", "publishes/s", "ratio to plain",
                       "side-effect runs", "distinct keys", "extra runs",
                       "keys run more than once", "AlreadyQueued raised"], rows)
        rows = [[share, *(_f(block["idempotent_over"][peer]) for peer in PEERS),
                 _f(min(block["idempotent_over"].values()))]
                for share, block in data["results"].items() if "idempotent_over" in block]
        if rows:
            out += ["", f"**2b. IdempotentTask against the peers by duplicate share** "
                    f"(publishes per second end to end, median of {data['rounds']} "
                    "interleaved rounds; > 1: IdempotentTask is faster).", ""]
            out += _table(["duplicates", "IdempotentTask / celery-once",
                           "IdempotentTask / celery-singleton",
                           "against the faster peer"], rows)
        if "crossover" in data:
            out += ["", f"Crossover (IdempotentTask stays ahead of both peers from this share "
                    f"on, interpolated): {data['crossover']['text']}."]
    if "publish" in sections:
        data = sections["publish"]
        out += ["", f"**3. Publish path**: one thread, {data['calls_per_run']} calls per run, "
                f"Redis broker, no worker; median of {data['rounds']} rounds.", ""]
        rows = [[case, f"{values['publishes_per_s']:.0f}", _f(values["ratio_to_plain"])]
                for case, values in data["results"].items()]
        out += _table(["case", "publishes/s", "ratio to plain apply_async"], rows)
    if "bulk" in sections:
        data = sections["bulk"]
        out += ["", f"**3b. Bulk publishing**: {data['calls_per_run']} keyed calls, "
                f"{data['duplicate_share']:.0%} of them repeats ({data['distinct_keys']} keys), "
                f"one thread, Redis broker, no worker; median of {data['rounds']} rounds. Calls "
                "per second, repeats included (plain sends them too).", ""]
        rows = [[case, f"{values['calls_per_s']:.0f}", _f(values["ratio_to_plain"])]
                for case, values in data["results"].items()]
        out += _table(["case", "calls/s", "ratio to plain apply_async"], rows)
    if "roundtrips" in sections:
        data = sections["roundtrips"]
        phases = ["publish, new key", "publish, duplicate while pending", "execute (first run)",
                  "publish, duplicate after success", "execute, duplicate of a succeeded key"]
        out += ["", "**4. Store round trips per operation** (MONITOR on the store's own "
                "redis-server: commands sent by clients; in brackets, all commands Redis "
                "executed per operation from INFO commandstats, Lua-internal ones included).",
                ""]
        rows = []
        for config, values in data["results"].items():
            row = [config]
            for phase in phases:
                item = values.get(phase)
                row.append("n/a" if item is None else
                           f"{_f(item['round_trips'])} [{_f(item['commands_executed'], 1)}]")
            rows.append(row)
        out += _table(["configuration", *phases], rows)
    if "memory" in sections:
        data = sections["memory"]
        out += ["", f"**5. Memory per succeeded record** (result of "
                f"{data['result_json_bytes']} bytes of JSON, TTL 7 days; used_memory delta / "
                f"records; hash encoding {data['layout']['encoding']}, MEMORY USAGE of one "
                f"record {data['layout']['memory_usage_median']:.0f} bytes).", ""]
        rows = [[f"{int(point):,}", f"{values['bytes_per_record']:.0f}"]
                for point, values in data["points"].items()]
        out += _table(["succeeded records", "bytes per record"], rows)
        out += ["", f"Seeding: {data['method']}."]
    if "wakeups" in sections:
        data = sections["wakeups"]
        out += ["", "**7. Waiting without polling**: completion write -> a waiting "
                "`IdempotentResult.get()` returns (threads of one process, one shared "
                f"subscription). PING p50 {data['ping']['p50_ms']:.2f} ms, p99 "
                f"{data['ping']['p99_ms']:.2f} ms meanwhile.", ""]
        out += _table(["store, waiters", "p50 ms", "p90 ms", "p99 ms", "max ms", "n"],
                      [[name, _f(s["p50_ms"]), _f(s["p90_ms"]), _f(s["p99_ms"]),
                        _f(s["max_ms"]), str(s["n"])] for name, s in data["get"].items()])
        out += ["", "A duplicate message blocked by a live owner (prefork worker): owner's "
                "completion -> the duplicate's link callback ran.", ""]
        out += _table(["owner run", "p50 ms", "p90 ms", "max ms", "n"],
                      [[name, _f(b["callback_after_completion"]["p50_ms"], 1),
                        _f(b["callback_after_completion"]["p90_ms"], 1),
                        _f(b["callback_after_completion"]["max_ms"], 1),
                        str(b["callback_after_completion"]["n"])]
                       for name, b in data["duplicates"].items()])
    if "latency" in sections:
        data = sections["latency"]
        stats = data["stats"]
        out += ["", f"**6. Worker-side latency per task** ({data['iterations']} samples each, "
                "interleaved blocks, same redis-py client).", ""]
        rows = [[name, _f(s["p50_us"], 0), _f(s["p90_us"], 0), _f(s["p99_us"], 0),
                 _f(s["p50_us"] / stats["ping"]["p50_us"])]
                for name, s in stats.items()]
        out += _table(["operation", "p50 µs", "p90 µs", "p99 µs", "p50 / PING p50"], rows)
        out += ["", f"Whole worker-side overhead of `IdempotentTask` in-process "
                f"(`apply()` idempotent minus plain, p50): {data['apply_overhead_p50_us']:.0f} µs "
                f"= {data['apply_overhead_p50_over_ping_p50']:.1f} x PING, of which: "
                + "; ".join(f"{name} {value:.0f} µs" for name, value in
                            data["overhead_decomposition_p50_us"].items()) + "."]
        if "script_server_us_per_call" in data:  # results from before it was measured lack it
            out += ["", "Redis CPU per script call (`INFO commandstats`, each script alone over "
                    "unique keys, no steps or parked duplicates): " + "; ".join(
                        f"`{name}` {us:.1f} µs" for name, us in
                        data["script_server_us_per_call"].items()) + "."]
    if "steps" in sections:
        from . import steps

        out += steps.table(sections["steps"])
    if "profile" in sections:
        from . import profile

        out += profile.table(sections["profile"])
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    sections = results["sections"]
    if "throughput" in sections:
        breakdown = _breakdown(sections)
        for label in FLOOR_BLOCKS:
            configs = sections["throughput"]["results"].get(label)
            if configs is None:
                continue
            target = (f"unique tasks {label}: IdempotentTask >= {MIN_RATIO_TO_FLOOR} x floor "
                      "(plain + 3 bare store round trips)")
            if "stalled" in configs or "floor" not in configs:
                checks.append({"target": target, "value": "not measured", "met": False})
                continue
            ratio = configs["idempotent"]["tasks_per_s"] / configs["floor"]["tasks_per_s"]
            detail = f"gap {_gap_us(configs):.0f} µs/task end to end"
            if breakdown:
                detail += f"; worker p50: {breakdown}"
            checks.append({"target": target, "value": round(ratio, 3), "detail": detail,
                           "met": ratio >= MIN_RATIO_TO_FLOOR})
    if "work" in sections:
        for label, configs in sections["work"]["results"].items():
            if "stalled" in configs:
                continue
            ratio = configs["idempotent"]["ratio_to_plain"]
            checks.append({"target": f"unique tasks {label} with {sections['work']['work_ms']:g}"
                           f" ms of I/O: IdempotentTask >= {MIN_WORK_RATIO_TO_PLAIN} x plain",
                           "value": round(ratio, 3), "met": ratio >= MIN_WORK_RATIO_TO_PLAIN})
    if "duplicates" in sections:
        data = sections["duplicates"]
        ahead = {share: min(block["idempotent_over"].values())
                 for share, block in data["results"].items()
                 if "idempotent_over" in block and block["share"] >= AHEAD_OF_PEERS_FROM - 1e-9}
        if ahead:
            worst = min(ahead, key=lambda share: ahead[share])
            checks.append({
                "target": f"duplicates: IdempotentTask ahead of celery-once and celery-singleton "
                          f"end to end from {AHEAD_OF_PEERS_FROM:.0%} duplicates",
                "value": round(ahead[worst], 3),
                "detail": f"lowest at {worst}; crossover {data['crossover']['text']}",
                "met": all(ratio > 1.0 for ratio in ahead.values())})
        for share, block in data["results"].items():
            values = block["configs"]["idempotent"]
            checks.append({"target": f"duplicates {share}: IdempotentTask runs each key once",
                           "value": f"{values['executions']:.0f} runs / "
                                    f"{block['distinct_keys']} keys",
                           "met": values["executions"] == block["distinct_keys"]
                           and values["keys_run_more_than_once"] == 0})
    if "roundtrips" in sections:
        idem = sections["roundtrips"]["results"].get("idempotent", {})
        for phase, limit in MAX_ROUND_TRIPS.items():
            if phase in idem:
                value = idem[phase]["round_trips"]
                checks.append({"target": f"round trips, {phase}: <= {limit}",
                               "value": round(value, 2), "met": value <= limit + 1e-9})
    if "bulk" in sections:
        ratio = sections["bulk"]["results"]["idempotent apply_many"]["ratio_to_plain"]
        checks.append({"target": f"bulk: apply_many (30% repeats) >= {MIN_BULK_RATIO_TO_PLAIN} x "
                       "plain apply_async of the same calls", "value": round(ratio, 3),
                       "met": ratio >= MIN_BULK_RATIO_TO_PLAIN})
        group_ratio = sections["bulk"].get("group_ratio_to_plain_group")
        if group_ratio is not None:  # results written before the group cases had none
            checks.append({"target": f"group: IdempotentGroup (30% repeats) >= "
                           f"{MIN_GROUP_RATIO_TO_PLAIN_GROUP} x celery.group of the same "
                           "members", "value": round(group_ratio, 3),
                           "met": group_ratio >= MIN_GROUP_RATIO_TO_PLAIN_GROUP})
    if "latency" in sections:
        value = sections["latency"]["claim_complete_p50_over_ping_p50"]
        checks.append({"target": f"worker overhead (claim + complete) p50 <= "
                       f"{MAX_LATENCY_OVER_PING} x PING p50", "value": round(value, 2),
                       "met": value <= MAX_LATENCY_OVER_PING})
    if "wakeups" in sections:
        checks += sections["wakeups"]["targets"]
    if "memory" in sections:
        for point, values in sections["memory"]["points"].items():
            value = values["bytes_per_record"]
            checks.append({"target": f"memory at {int(point):,} records <= "
                           f"{MAX_BYTES_PER_RECORD} bytes per record", "value": round(value),
                           "met": value <= MAX_BYTES_PER_RECORD})
    return checks


def _breakdown(sections: dict[str, Any]) -> str | None:
    """The worker-side decomposition of IdempotentTask's overhead (p50 µs), from the latency
    section or the short one the throughput section runs without it."""
    data = sections.get("latency") or sections.get("throughput", {}).get("breakdown")
    if not data:
        return None
    parts = data["overhead_decomposition_p50_us"]
    return ", ".join(f"{short} {parts[name]:.0f} µs" for name, short in BREAKDOWN.items()
                     if name in parts)


def _gap_us(configs: dict[str, Any]) -> float:
    """Wall time per task above the floor's, end to end (µs)."""
    idem, floor = configs["idempotent"]["tasks_per_s"], configs["floor"]["tasks_per_s"]
    return 1e6 / float(idem) - 1e6 / float(floor)


def target_lines(checks: list[dict[str, Any]]) -> list[str]:
    rows = [[check["target"],
             str(check["value"]) + (f" ({check['detail']})" if check.get("detail") else ""),
             "met" if check["met"] else "**MISSED**"]
            for check in checks]
    return ["", "**Targets** (checked, not asserted):", "",
            *_table(["target", "measured", "result"], rows)]


def machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
    services = results.get("services", {})
    return [
        f"- Command: `{results['command']}` ({results['mode']} mode), "
        f"{results['runtime_s'] / 60:.1f} min, {results['started']}",
        f"- Machine: {machine['cpu_model']}, {machine['cpus']} CPUs, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, load average "
        f"{machine['load_average_at_start']} at start, {machine.get('load_average_at_end')} "
        "at end (the machine is shared: ratios are within one run)",
        f"- Python {machine['python']}; {packages}",
        f"- redis-server {services.get('redis', '?')} (private, one for broker + counters, "
        f"one for the stores), RabbitMQ {services.get('rabbitmq', 'not used')}",
        f"- Commit {machine['commit']}"
        + (" + uncommitted changes" if machine["worktree_dirty"] else ""),
    ]


def chart(results: dict[str, Any], path: Path) -> Path | None:
    sections = results["sections"]
    if "throughput" not in sections and "duplicates" not in sections:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("throughput", "duplicates") if name in sections]
    if "duplicates" in sections:
        panels.append("peers")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    colors = {"plain": "#9e9e9e", "idempotent": "#1f77b4", "celery-once": "#ff7f0e",
              "celery-singleton": "#2ca02c", "floor": "#7f7f7f"}
    for axis, panel in zip(axes[0], panels, strict=True):
        if panel == "throughput":
            data = {label: configs for label, configs in
                    sections["throughput"]["results"].items() if "stalled" not in configs}
            if "work" in sections:
                work = sections["work"]
                for label, configs in work["results"].items():
                    if "stalled" not in configs:
                        data[f"{label}\n+{work['work_ms']:g} ms I/O"] = configs
            labels = list(data)
            configs = ["floor", "idempotent", "celery-once", "celery-singleton"]
            width = 0.2
            for index, config in enumerate(configs):
                points = [(i + (index - 1.5) * width, data[label][config]["ratio_to_plain"])
                          for i, label in enumerate(labels) if config in data[label]]
                if not points:
                    continue
                bars = axis.bar([x for x, _ in points], [y for _, y in points], width,
                                label="floor (plain + 3 PINGs)" if config == "floor" else config,
                                color=colors[config], hatch="//" if config == "floor" else None)
                axis.bar_label(bars, fmt="%.2f", fontsize=7)
            axis.axhline(1.0, color="#555", linewidth=0.8)
            axis.set_xticks(range(len(labels)), labels, fontsize=8)
            axis.set_ylabel("throughput / plain Celery (same run)")
            axis.set_ylim(0, 1.35)
            axis.set_title("1. Unique tasks: end-to-end throughput")
            axis.legend(fontsize=7, loc="upper center", ncol=2)
        elif panel == "peers":
            data = sections["duplicates"]["results"]
            shares = [s for s in data if "idempotent_over" in data[s]]
            xs = [data[s]["share"] * 100 for s in shares]
            for peer in PEERS:
                axis.plot(xs, [data[s]["idempotent_over"][peer] for s in shares], marker="o",
                          label=f"IdempotentTask / {peer}", color=colors[peer])
            axis.axhline(1.0, color="#555", linewidth=0.8)
            axis.axvline(AHEAD_OF_PEERS_FROM * 100, color="#1f77b4", linestyle="--",
                         linewidth=0.8, label=f"target: > 1 from {AHEAD_OF_PEERS_FROM:.0%}")
            axis.set_xlabel("duplicate share of the publishes (%)")
            axis.set_ylabel("publishes/s ratio, end to end (same run)")
            axis.set_title("2b. Against the peers by duplicate share")
            axis.legend(fontsize=7)
        else:
            data = sections["duplicates"]["results"]
            shares = list(data)
            configs = ["plain", "idempotent", "celery-once", "celery-singleton"]
            width = 0.2
            for index, config in enumerate(configs):
                xs = [i + (index - 1.5) * width for i in range(len(shares))]
                ys = [data[s]["configs"][config]["executions"] / data[s]["distinct_keys"]
                      for s in shares]
                bars = axis.bar(xs, ys, width, label=config, color=colors[config])
                axis.bar_label(bars, fmt="%.2f", fontsize=5)
            axis.axhline(1.0, color="#555", linewidth=0.8)
            axis.set_xticks(range(len(shares)), [f"{s} duplicates" for s in shares])
            axis.set_ylabel("side-effect runs per distinct key")
            axis.set_title("2. Duplicate-heavy workload: side-effect runs")
            axis.legend(fontsize=7)
    fig.suptitle(f"celery-idempotency benchmark ({results['mode']} mode, "
                 f"{results['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def docs_block(results: dict[str, Any], chart_name: str | None) -> str:
    lines = [BEGIN, "", "## Latest results", "", *machine_lines(results)]
    if chart_name:
        lines += ["", f"![benchmark chart]({chart_name})"]
    lines += tables(results)
    lines += target_lines(results["targets"])
    lines += ["", END]
    return "\n".join(lines)


def update_docs(results: dict[str, Any], chart_path: Path | None) -> None:
    chart_name = None
    if chart_path is not None and chart_path.exists():
        DOCS_CHART.write_bytes(chart_path.read_bytes())
        chart_name = DOCS_CHART.name
    block = docs_block(results, chart_name)
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    DOCS.write_text(pattern.sub(lambda _: block, text, count=1))
