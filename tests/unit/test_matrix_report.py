""".ci/matrix.py, which prints the support matrix at the end of `make test`: counts from the
JUnit files, a closing ``matrix: N passed, N failed`` line, and a failing status when a cell
failed, ran no test or left no results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "matrix.py"


def junit(path: Path, *, tests: int, failures: int = 0, errors: int = 0,
          skipped: int = 0) -> Path:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
                    f'failures="{failures}" errors="{errors}" skipped="{skipped}"/></testsuites>')
    return path


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_record_then_report_prints_versions_counts_and_the_closing_line(tmp_path: Path) -> None:
    recorded = run("record", "core-3.10(celery-5.4)", junit(tmp_path / "a.xml", tests=10,
                                                           skipped=2), "42", tmp_path)
    assert recorded.returncode == 0, recorded.stderr
    entry = json.loads((tmp_path / "core-3.10_celery-5.4.json").read_text())
    assert entry["python"] == ".".join(map(str, sys.version_info[:3]))
    assert entry["celery"] != "-" and entry["seconds"] == 42
    assert run("record", "full suite", junit(tmp_path / "b.xml", tests=5), "7",
               tmp_path).returncode == 0
    done = run("report", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "matrix: 13 passed, 0 failed, 2 skipped"
    table = "\n".join(lines)
    assert table.index("full suite") < table.index("core-3.10(celery-5.4)")  # primary first
    assert "42 s" in table and entry["celery"] in table


def test_a_failed_or_empty_cell_fails_the_report(tmp_path: Path) -> None:
    run("record", "bad", junit(tmp_path / "bad.xml", tests=4, failures=1, errors=1), "1",
        tmp_path)
    done = run("report", tmp_path)
    assert done.returncode == 1
    assert done.stdout.strip().splitlines()[-1] == "matrix: 2 passed, 2 failed, 0 skipped"

    empty = tmp_path / "empty"
    empty.mkdir()
    run("record", "nothing ran", junit(empty / "none.xml", tests=0), "1", empty)
    assert run("report", empty).returncode == 1


def test_a_cell_without_results_fails_the_report(tmp_path: Path) -> None:
    run("record", "crashed", tmp_path / "never-written.xml", "1", tmp_path)
    done = run("report", tmp_path)
    assert done.returncode == 1
    assert "no results" in done.stdout
    assert run("report", tmp_path / "missing").returncode == 1
