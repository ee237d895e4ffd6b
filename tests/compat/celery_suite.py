"""Celery's own integration suite, run with and without `IdempotentTask` as the app's task class.

The suite is taken from the sdist of the installed Celery release (downloaded once with pip into
``.cache/compat/``, never copied into the tree), and run against a private ``redis-server`` as
broker and result backend. In ``idempotent`` mode the app's ``task_cls`` is `IdempotentTask`, the
idempotency store is another database of the same server, emptied before each test.

    python -m tests.compat.celery_suite                  # both modes, the three modules, compared
    python -m tests.compat.celery_suite --mode idempotent -k test_chain_in_chain_with_args

Exit status 0 when every test that passes on plain Celery also passes with `IdempotentTask`,
except those listed in ``expected_failures.txt`` (deduplication semantics, not bugs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
CACHE = PROJECT / ".cache" / "compat"
EXPECTED_FAILURES = HERE / "expected_failures.txt"
MODULES = ("test_canvas.py", "test_tasks.py", "test_group_chains.py")
# Our own checks of what Celery's tests cannot see (e.g. that a duplicate ran once), written
# against Celery's fixtures and tasks: copied beside them and run in idempotent mode.
OWN_CHECKS = "test_idempotent_checks.py"
MODES = ("plain", "idempotent")
# Parts of the sdist the three modules import (t/integration imports t.canvas_helpers).
_MEMBERS = ("t/__init__.py", "t/canvas_helpers.py", "t/integration/")
_PYTEST_INI = """\
[pytest]
python_classes = test_*
markers =
    flaky
    timeout
    amqp
filterwarnings = ignore::DeprecationWarning
"""


def celery_version() -> str:
    return version("celery")


def fetch_sdist(release: str | None = None, cache: Path = CACHE) -> Path:
    """The sdist of ``release`` (default: the installed Celery), downloaded once into ``cache``."""
    release = release or celery_version()
    wanted = cache / f"celery-{release}.tar.gz"
    if not wanted.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"celery=={release}",
                        "--no-deps", "--no-binary", ":all:", "-d", str(cache), "-q"],
                       check=True, stdout=subprocess.DEVNULL)
    if not wanted.exists():
        raise RuntimeError(f"pip download did not produce {wanted}")
    return wanted


def prepare_run_dir(sdist: Path, run_dir: Path, *, idempotent: bool, store_url: str) -> Path:
    """Extract Celery's ``t/integration`` into ``run_dir`` beside our conftest and ini."""
    top = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers()
                   if any(m.name.startswith(f"{top}/{part}") for part in _MEMBERS)]
        for member in members:
            member.name = member.name.removeprefix(f"{top}/")
        archive.extractall(run_dir, members=members, filter="data")
    (run_dir / "pytest.ini").write_text(_PYTEST_INI)
    shutil.copy(HERE / "run_conftest.py", run_dir / "conftest.py")
    shutil.copy(HERE / "idempotent_checks.py", run_dir / "t" / "integration" / OWN_CHECKS)
    # Celery's integration conftest merges this file (from the rootdir) into the app config.
    overrides = {"idempotency_store_url": store_url} if idempotent else {}
    (run_dir / "integration-tests-config.json").write_text(json.dumps(overrides))
    return run_dir


@dataclass
class RunResult:
    mode: str
    outcomes: dict[str, str]
    returncode: int
    log: Path

    def count(self, outcome: str, module: str | None = None) -> int:
        return sum(1 for name, value in self.outcomes.items()
                   if value == outcome and (module is None or name.startswith(module)))


def run_suite(mode: str, redis_port: int, *, selection: Sequence[str] = MODULES,
              pytest_args: Sequence[str] = (), timeout: float = 180,
              log_dir: Path | None = None) -> RunResult:
    """Run ``selection`` (modules, or test ids, of ``t/integration``) of Celery's integration
    suite once, in ``mode``; the outcome per test."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    sdist = fetch_sdist()
    log_dir = log_dir or CACHE / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    store_url = f"redis://127.0.0.1:{redis_port}/2"
    with tempfile.TemporaryDirectory(prefix=f"celery-compat-{mode}-") as tmp:
        run_dir = prepare_run_dir(sdist, Path(tmp), idempotent=mode == "idempotent",
                                  store_url=store_url)
        report = run_dir / "outcomes.json"
        env = {**os.environ,
               "TEST_BROKER": f"redis://127.0.0.1:{redis_port}/0",
               "TEST_BACKEND": f"redis://127.0.0.1:{redis_port}/0",
               "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_port),
               "COMPAT_MODE": mode, "COMPAT_STORE_URL": store_url,
               "COMPAT_REPORT": str(report), "COMPAT_TIMEOUT": str(timeout)}
        env.pop("PYTEST_ADDOPTS", None)
        log = log_dir / f"{mode}.log"
        with log.open("w") as out:
            completed = subprocess.run(
                [sys.executable, "-m", "pytest", "-c", str(run_dir / "pytest.ini"),
                 "--rootdir", str(run_dir), "-p", "celery.contrib.pytest",
                 "-p", "no:cacheprovider", "-o", "console_output_style=classic", "-rfE",
                 *(f"t/integration/{name}" for name in selection), *pytest_args],
                cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        outcomes = json.loads(report.read_text()) if report.exists() else {}
    return RunResult(mode, outcomes, completed.returncode, log)


def load_expected_failures(path: Path = EXPECTED_FAILURES) -> dict[str, str]:
    """``test id: reason`` per line; an id matches itself, its parameters and its members."""
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, reason = line.partition("  ")
        if not sep or not reason.strip():
            raise ValueError(f"{path.name}: {line!r} needs a reason after two spaces")
        entries[name.strip()] = reason.strip()
    return entries


def expected_reason(test: str, expected: dict[str, str]) -> str | None:
    for name, reason in expected.items():
        if test == name or test.startswith((name + "[", name + "::")):
            return reason
    return None


def unexpected_failures(idempotent: RunResult, plain: RunResult | None,
                        expected: dict[str, str]) -> list[str]:
    """Tests that fail with `IdempotentTask` although they pass on plain Celery (or, without a
    plain run, at all) and are not expected to."""
    failures = []
    for test, outcome in sorted(idempotent.outcomes.items()):
        if outcome != "failed" or expected_reason(test, expected):
            continue
        if plain is not None and plain.outcomes.get(test) != "passed":
            continue
        failures.append(test)
    return failures


def summary(results: Iterable[RunResult], modules: Sequence[str] = MODULES) -> str:
    lines = []
    for result in results:
        for module in modules:
            lines.append(f"{result.mode:>10} {module:<22} "
                         f"{result.count('passed', module)} passed, "
                         f"{result.count('failed', module)} failed, "
                         f"{result.count('skipped', module)} skipped")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--module", action="append", dest="modules",
                        choices=(*MODULES, OWN_CHECKS))
    parser.add_argument("--timeout", type=float, default=180, help="per test, in seconds")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="passed on to pytest (e.g. -k NAME, -x)")
    options = parser.parse_args(argv)
    modules = tuple(options.modules or (*MODULES, OWN_CHECKS))
    sys.path.insert(0, str(PROJECT))
    from tests.support.services import RedisServer

    server = RedisServer().start()
    try:
        modes = MODES if options.mode == "both" else (options.mode,)
        results = {}
        for mode in modes:
            server.client().flushall()  # nothing left over from the other mode's run
            results[mode] = run_suite(mode, server.port, selection=modules,
                                      timeout=options.timeout, pytest_args=options.pytest_args)
    finally:
        server.close()
    print(summary(results.values(), modules))
    for result in results.values():
        print(f"{result.mode}: log in {result.log}")
    if "idempotent" not in results:
        return 0
    expected = load_expected_failures()
    failures = unexpected_failures(results["idempotent"], results.get("plain"), expected)
    for test in failures:
        print(f"UNEXPECTED FAILURE with IdempotentTask: {test}")
    print(f"{len(failures)} unexpected failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
