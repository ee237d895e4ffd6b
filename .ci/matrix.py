"""The support matrix as `make test` ran it: one line per cell with its versions, pass counts and
wall time, then a closing ``matrix: N passed, N failed`` line. Standard library only.

    python .ci/matrix.py record NAME JUNIT_XML SECONDS REPORTS_DIR
        (run with the cell's own interpreter) writes REPORTS_DIR/<NAME>.json: the cell's
        Python, Celery, kombu, redis-py and billiard versions, its JUnit file and wall time.
    python .ci/matrix.py report REPORTS_DIR
        prints the matrix; exit status 1 if a cell failed, lacks its results or ran no test.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

PACKAGES = ("celery", "kombu", "redis", "billiard")


def record(name: str, junit: str, seconds: str, reports: str) -> None:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    entry = {"cell": name, "python": platform.python_version(), **versions,
             "junit": str(Path(junit).resolve()), "seconds": int(float(seconds))}
    path = Path(reports) / (re.sub(r"[^\w.-]+", "_", name).strip("_") + ".json")
    path.write_text(json.dumps(entry, indent=1) + "\n")


def counts(junit: Path) -> dict[str, int] | None:
    """passed/failed/skipped of a JUnit file (errors count as failed); None if unreadable."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {"tests": 0, "failed": 0, "skipped": 0}
    for suite in suites:
        total["tests"] += int(suite.get("tests", 0))
        total["failed"] += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        total["skipped"] += int(suite.get("skipped", 0))
    return {"passed": total["tests"] - total["failed"] - total["skipped"],
            "failed": total["failed"], "skipped": total["skipped"]}


def report(reports: str) -> int:
    entries = [json.loads(p.read_text()) for p in sorted(Path(reports).glob("*.json"))]
    # The primary full suite first, then the cells in name order.
    entries.sort(key=lambda e: (not e["cell"].startswith("full suite"), e["cell"]))
    header = ("cell", "python", "celery", "kombu", "redis-py", "passed", "failed", "skipped",
              "time")
    rows, status = [], 0
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for entry in entries:
        found = counts(Path(entry["junit"]))
        if found is None:
            status = 1
            numbers = ("no results",) * 3
        else:
            if found["failed"] or not found["passed"]:
                status = 1
            for key in totals:
                totals[key] += found[key]
            numbers = (str(found["passed"]), str(found["failed"]), str(found["skipped"]))
        rows.append((entry["cell"], entry["python"], entry["celery"], entry["kombu"],
                     entry["redis"], *numbers, f"{entry['seconds']} s"))
    if not rows:
        print(f"support matrix: no results in {reports}")
        return 1
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print("\nSupport matrix (make test)")
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(f"matrix total: {sum(e['seconds'] for e in entries)} s")
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, "
          f"{totals['skipped']} skipped")
    return status


def main(argv: list[str]) -> int:
    if len(argv) == 6 and argv[1] == "record":
        record(*argv[2:])
        return 0
    if len(argv) == 3 and argv[1] == "report":
        return report(argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
