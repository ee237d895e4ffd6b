"""The support matrix: Python 3.10 to 3.13 x Celery 5.4 to 5.7, with uv-made environments.

Each Celery minor has a constraint file, ``constraints/celery-X.Y.txt``: a full set of pins
known to work together (celery, kombu, redis-py, billiard, click, ...). The files are the
resolutions a user gets (newest releases of that minor), except ``celery-5.4.txt``, which holds
the floor of every direct dependency (celery 5.4.0, kombu 5.4.0, redis-py 5.0.0, click 8.1.3).
Regenerate them with ``nox -s constraints``.

Sessions:

- ``core-<python>(celery-<minor>)``: the unit, store-contract, dedup, crash-safety and
  worker-lost tests on one cell (``nox -l`` lists all 16; arguments after ``--`` go to
  pytest). ``make test`` runs the cells named in its ``MATRIX_CELLS``; the full suite runs on
  the primary version in ``.venv``.
- ``quick-<python>(celery-<minor>)``: the same without the crash-safety tests (half the time).
- ``resolutions``: resolves the package as a user would (``uv pip compile``) for each Celery
  minor, newest and lowest direct dependencies, on the oldest and the newest Python, checks
  that no resolution pairs kombu with a redis-py its Redis transport rejects, and runs the
  dedup tests on each resolution no ``core`` cell pins.
- ``constraints``: regenerates ``constraints/``.

Each session writes ``.reports/<session>.xml`` (JUnit) and ``.reports/<session>.json``
(versions and wall time); ``python .ci/matrix.py report .reports`` prints the matrix.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / ".reports"
CONSTRAINTS = ROOT / "constraints"
MATRIX_SCRIPT = ROOT / ".ci" / "matrix.py"

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
CELERY_MINORS = ("5.4", "5.5", "5.6", "5.7")
# What a core cell runs: everything that depends on the Celery/kombu/redis-py versions most.
CORE_TESTS = (
    "tests/unit",
    "tests/store/test_contract.py",
    "tests/integration/test_dedup.py",
    # Celery's group keeps the frozen results, not what apply_async returns: version-specific.
    "tests/integration/test_group_batch.py",
    "tests/integration/test_lost_workers.py",
    "tests/integration/test_revoke_and_expiry.py",
    "tests/integration/test_leases_and_fencing.py",
    "tests/integration/test_store_outages.py",
)
# A hung test fails (pytest-timeout) instead of eating the CI budget.
PYTEST_LIMITS = ("--timeout=300",)
# Without the slow crash scenarios (revokes, leases, outages while a task runs).
QUICK_TESTS = tuple(path for path in CORE_TESTS
                    if not path.endswith(("test_revoke_and_expiry.py",
                                          "test_leases_and_fencing.py",
                                          "test_store_outages.py")))
SMOKE_TESTS = ("tests/unit/test_celery_compat.py", "tests/integration/test_dedup.py")
# How each constraint file was resolved (see the module docstring).
RESOLUTION_OF = {"5.4": "lowest-direct", "5.5": "highest", "5.6": "highest", "5.7": "highest"}

nox.needs_version = ">=2024.10.9"
nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "yes"


def _use_local_interpreters() -> None:
    """The interpreters are pyenv's (/root/.pyenv/versions/X.Y.Z) or on PATH; never let uv
    download one (CI reaches PyPI only): a missing Python is an error that names it."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = []
    for version in PYTHONS:
        candidates = sorted(glob.glob(str(pyenv_root / "versions" / f"{version}.*" / "bin")))
        if candidates:
            found.append(candidates[-1])
    os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])
    os.environ["UV_PYTHON_DOWNLOADS"] = "never"
    os.environ.setdefault("UV_PYTHON_PREFERENCE", "only-system")


_use_local_interpreters()


def _record(session: nox.Session, name: str, junit: Path, started: float) -> None:
    session.run("python", str(MATRIX_SCRIPT), "record", name, str(junit),
                str(round(time.monotonic() - started)), str(REPORTS), silent=True)


def _report_name(session: nox.Session) -> str:
    return re.sub(r"[^\w.-]+", "_", session.name).strip("_")


def _check_celery_minor(session: nox.Session, minor: str) -> None:
    installed = session.run("python", "-c", "import celery; print(celery.__version__)",
                            silent=True)
    if not str(installed).strip().startswith(minor + "."):
        session.error(f"constraints/celery-{minor}.txt installed Celery {installed!s}")


def _run_cell(session: nox.Session, celery: str, tests: tuple[str, ...]) -> None:
    started = time.monotonic()
    REPORTS.mkdir(exist_ok=True)
    session.install("-c", str(CONSTRAINTS / f"celery-{celery}.txt"), "-e", ".[test]")
    _check_celery_minor(session, celery)
    junit = REPORTS / f"{_report_name(session)}.xml"
    try:
        session.run("pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *PYTEST_LIMITS,
                    *tests, *session.posargs)
    finally:
        _record(session, session.name, junit, started)


@nox.session(python=list(PYTHONS))
@nox.parametrize("celery", list(CELERY_MINORS), ids=[f"celery-{c}" for c in CELERY_MINORS])
def core(session: nox.Session, celery: str) -> None:
    """The version-sensitive tests on one Python x Celery cell."""
    _run_cell(session, celery, CORE_TESTS)


@nox.session(python=list(PYTHONS))
@nox.parametrize("celery", list(CELERY_MINORS), ids=[f"celery-{c}" for c in CELERY_MINORS])
def quick(session: nox.Session, celery: str) -> None:
    """The core tests but the crash-safety suite (half the time): for the middle cells."""
    _run_cell(session, celery, QUICK_TESTS)


def _compile(session: nox.Session, python: str, resolution: str, *requirements: str) -> str:
    spec = REPORTS / "resolution.in"
    spec.write_text("\n".join(requirements) + "\n")
    output = session.run(sys.executable, "-m", "uv", "pip", "compile", "-q", "--no-header",
                         "--no-annotate", "--python-version", python, "--resolution",
                         resolution, str(spec), "pyproject.toml", silent=True, external=True)
    return str(output)


def _pins(resolved: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", resolved, re.MULTILINE)}


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


# kombu's Redis transport refuses a redis-py older than this at the first publish
# (VersionMismatch), from this kombu on.
KOMBU_NEEDS_REDIS = (((5, 7), (6, 1, 0)),)


def _rejected_pair(pins: dict[str, str]) -> str | None:
    kombu, redis = _release(pins["kombu"]), _release(pins["redis"])
    for since, needs in KOMBU_NEEDS_REDIS:
        if kombu[:2] >= since and redis < needs:
            return (f"kombu {pins['kombu']} with redis-py {pins['redis']}: its Redis transport "
                    f"needs redis-py >= {'.'.join(map(str, needs))}")
    return None


@nox.session(python="3.10")
def resolutions(session: nox.Session) -> None:
    """What a resolver picks for this package next to each Celery minor, and that it works."""
    started = time.monotonic()
    REPORTS.mkdir(exist_ok=True)
    problems, untested = [], []
    for minor in CELERY_MINORS:
        # A user's own pin, with and without Celery's redis extra (the extra once paired
        # kombu 5.7 with redis-py 5, and every publish failed).
        for requirement in (f"celery[redis]=={minor}.*", f"celery=={minor}.*"):
            for python in ("3.10", "3.13"):
                for resolution in ("highest", "lowest-direct"):
                    pins = _pins(_compile(session, python, resolution, requirement))
                    cell = (f"{requirement} python {python} {resolution}: celery "
                            f"{pins['celery']}, kombu {pins['kombu']}, redis-py {pins['redis']}")
                    session.log(cell)
                    if (problem := _rejected_pair(pins)) is not None:
                        problems.append(f"{cell}: {problem}")
                    if RESOLUTION_OF[minor] != resolution and python == "3.10" and \
                            requirement.startswith("celery[redis]"):
                        untested.append((minor, resolution))
    if problems:
        session.error("resolutions that cannot work:\n" + "\n".join(problems))
    # The resolutions that no constraint file pins: install each and run the smoke tests.
    junits = []
    for minor, resolution in untested:
        resolved = REPORTS / f"resolved-celery-{minor}-{resolution}.txt"
        resolved.write_text(_compile(session, "3.10", resolution, f"celery[redis]=={minor}.*"))
        session.install("-c", str(resolved), "-e", ".[test]")
        _check_celery_minor(session, minor)
        junit = REPORTS / f"resolutions_celery-{minor}-{resolution}.xml"
        junits.append(junit)
        try:
            session.run("pytest", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *PYTEST_LIMITS, *SMOKE_TESTS, *session.posargs)
        finally:
            _record(session, f"resolutions-3.10(celery-{minor}, {resolution})", junit,
                    started)
            started = time.monotonic()


@nox.session(python=False)
def constraints(session: nox.Session) -> None:
    """Regenerate constraints/celery-X.Y.txt (universal: valid on every supported Python)."""
    REPORTS.mkdir(exist_ok=True)
    for minor, resolution in RESOLUTION_OF.items():
        spec = REPORTS / "constraints.in"
        spec.write_text(f"celery=={minor}.*\n")
        what = "the floor of every direct dependency" if resolution == "lowest-direct" \
            else "the newest releases"
        pins = session.run(sys.executable, "-m", "uv", "pip", "compile", "-q", "--universal",
                           "--no-header", "--no-annotate", "--python-version", PYTHONS[0],
                           "--resolution", resolution, str(spec), "pyproject.toml",
                           silent=True, external=True)
        (CONSTRAINTS / f"celery-{minor}.txt").write_text(
            f"# Celery {minor}: {what} (uv pip compile --resolution {resolution}).\n"
            f"# Regenerate: nox -s constraints\n{pins}")
