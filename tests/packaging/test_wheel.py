"""The package as a user gets it: ``python -m build`` makes an sdist and, from that sdist, a
wheel; ``twine check`` accepts both; the wheel installed into a fresh virtual environment
carries its Lua scripts, ``py.typed`` and both CLI entry points, and runs the demo.

The demo (examples/, which the wheel does not ship) runs from a copy outside the source tree,
with no PYTHONPATH, so that the package can only come from the installed wheel.

The environment has no optional extra installed: the core package imports without Django,
FastAPI and OpenTelemetry, and each integration module says which extra it needs.
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import celery_idempotency
from tests.support.skipping import missing_service

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "celery_idempotency"
# The Celery the primary environment runs with (constraints/ holds one set per Celery minor).
CONSTRAINTS = ROOT / "constraints" / "celery-5.7.txt"
# The optional extras: each one's integration module, and the distribution it needs.
EXTRAS = {"fastapi": ("celery_idempotency.fastapi", "fastapi"),
          "django": ("celery_idempotency.django", "django"),
          "otel": ("celery_idempotency.otel", "opentelemetry")}


@dataclass
class Installed:
    dist: Path
    wheel: Path
    sdist: Path
    venv: Path
    workdir: Path  # outside the source tree

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *argv: str | Path, timeout: float = 120,
            **env: str) -> subprocess.CompletedProcess[str]:
        environ = {name: value for name, value in os.environ.items()
                   if name not in ("PYTHONPATH", "REDIS_URL", "DEMO_STORE", "VIRTUAL_ENV")}
        environ["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
        return subprocess.run([str(arg) for arg in argv], cwd=self.workdir,
                              env={**environ, **env}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)


def _checked(done: subprocess.CompletedProcess[str], what: str) -> str:
    assert done.returncode == 0, (f"{what} failed (exit {done.returncode}):\n"
                                  f"{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    return done.stdout


def _uv(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uv", *map(str, args)], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"})


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    for module in ("build", "twine", "uv"):
        if importlib.util.find_spec(module) is None:
            missing_service(f"{module} is not installed (pip install -e '.[test]')")
    base = tmp_path_factory.mktemp("packaging")
    dist = base / "dist"
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist, so
    # a file missing from the sdist shows up as a broken wheel too.
    _checked(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                            capture_output=True, text=True, timeout=600), "python -m build")
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    venv = base / "venv"
    created = _uv("venv", "-q", "-p", sys.executable, venv)
    _checked(created, "uv venv")
    done = _uv("pip", "install", "-q", "-p", venv / "bin" / "python", "-c", CONSTRAINTS,
               wheels[0])
    if done.returncode != 0 and "Failed to fetch" in done.stderr + done.stdout:
        missing_service(f"the package index is unreachable:\n{done.stderr[-2000:]}")
    _checked(done, f"uv pip install {wheels[0].name}")
    workdir = base / "app"
    shutil.copytree(ROOT / "examples", workdir / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    yield Installed(dist, wheels[0], sdists[0], venv, workdir)


def test_twine_accepts_the_sdist_and_the_wheel(installed: Installed) -> None:
    out = _checked(subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                                   str(installed.wheel), str(installed.sdist)],
                                  capture_output=True, text=True, timeout=120), "twine check")
    assert out.count("PASSED") == 2, out


def test_the_wheel_ships_every_module_lua_script_py_typed_and_the_license(
        installed: Installed) -> None:
    expected = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*")
                if path.is_file() and path.suffix in (".py", ".lua", ".typed")}
    assert any(name.endswith(".lua") for name in expected)
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), sorted(names)
    text = metadata.decode()
    assert f"Version: {celery_idempotency.__version__}\n" in text
    assert "License-Expression: MIT" in text
    assert "Requires-Dist: kombu[redis]" in text


def test_the_installed_package_comes_from_the_wheel(installed: Installed) -> None:
    out = _checked(installed.run(
        installed.python, "-I", "-c",
        "import importlib.metadata as m, importlib.resources as r, sys, celery_idempotency as c;"
        "print(c.__file__); print(c.__version__, m.version('celery-idempotency'));"
        "files = r.files('celery_idempotency');"
        "print((files / 'py.typed').is_file());"
        "print(sorted(p.name for p in (files / 'store' / 'lua').iterdir()));"
        "print(sys.path)"), "importing the installed package")
    location, versions, typed, lua, path = out.splitlines()
    assert location.startswith(str(installed.venv)), location
    assert versions == f"{celery_idempotency.__version__} {celery_idempotency.__version__}"
    assert typed == "True"
    assert lua == repr(sorted(p.name for p in (PACKAGE / "store" / "lua").glob("*.lua")))
    assert str(ROOT) not in path, path


def test_both_cli_entry_points_are_installed(installed: Installed) -> None:
    standalone = _checked(installed.run(installed.venv / "bin" / "celery-idempotency", "--help"),
                          "celery-idempotency --help")
    assert "--store-url" in standalone and "purge" in standalone, standalone
    # The celery.commands plugin, found through the installed entry point metadata.
    plugin = _checked(installed.run(installed.venv / "bin" / "celery", "-A", "examples.shop",
                                    "idempotency", "--help"),
                      "celery -A examples.shop idempotency --help")
    assert "Inspect and manage idempotency keys" in plugin, plugin
    version = _checked(installed.run(installed.venv / "bin" / "celery-idempotency",
                                     "--store-url", "redis://127.0.0.1:1", "--version"),
                       "celery-idempotency --version")
    assert celery_idempotency.__version__ in version, version


def test_the_demo_runs_against_the_installed_wheel(installed: Installed) -> None:
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH")
    done = installed.run(installed.python, installed.workdir / "examples" / "demo.py",
                         timeout=180, CI="true", DEMO_STORE="redis")
    out = _checked(done, "examples/demo.py against the installed wheel")
    assert "DEMO OK" in out, out
    assert "celery -A examples.shop worker" in out, out  # a real worker process
    assert "[ok] each published message was finished exactly once" in out, out


# Run in the wheel's environment: import every module of the package but the extras' own, then
# each extra's module, and report what happened as JSON.
_IMPORT_ALL = """
import importlib, importlib.util, json, pkgutil, sys
extras = json.loads(sys.argv[1])
missing = {dist: importlib.util.find_spec(dist) is None for _, dist in extras.values()}
import celery_idempotency
core = []
for info in pkgutil.walk_packages(celery_idempotency.__path__, "celery_idempotency."):
    if not any(info.name == m or info.name.startswith(m + ".") for m, _ in extras.values()):
        importlib.import_module(info.name)
        core.append(info.name)
failures = {}
for extra, (module, _) in extras.items():
    try:
        importlib.import_module(module)
    except ImportError as error:
        failures[extra] = str(error)
print(json.dumps({"missing": missing, "core": core, "failures": failures}))
"""


def test_the_core_imports_without_the_extras_and_each_extra_names_itself(
        installed: Installed) -> None:
    out = _checked(installed.run(installed.python, "-I", "-c", _IMPORT_ALL, json.dumps(EXTRAS)),
                   "importing the package without its optional extras")
    report = json.loads(out)
    # The environment really lacks them (nothing in the core dependencies pulls them in).
    assert report["missing"] == {dist: True for _, dist in EXTRAS.values()}, report
    assert {"celery_idempotency.http", "celery_idempotency.cli"} <= set(report["core"]), report
    for extra, (module, _) in EXTRAS.items():
        assert extra in report["failures"], f"{module} imported without its extra: {report}"
        message = report["failures"][extra]
        # A module of the wheel that refuses to load, not one missing from it.
        assert f"No module named '{module}'" not in message, message
        assert f"celery-idempotency[{extra}]" in message, message


def test_the_wheel_declares_the_optional_extras(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(wheel.read(name).decode())
    provided = set(metadata.get_all("Provides-Extra") or [])
    assert set(EXTRAS) <= provided, provided
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
    for extra, (_, dist) in EXTRAS.items():
        needs = [r for r in requirements if r.marker and r.marker.evaluate({"extra": extra})]
        assert any(r.name.lower().startswith(dist) for r in needs), (extra, [str(r) for r in needs])
    # ... and the core requires none of them: they stay optional.
    core = [r.name.lower() for r in requirements if "extra" not in str(r.marker)]
    assert not [n for n in core if n.startswith(tuple(d for _, d in EXTRAS.values()))], core
