"""The private Celery surface that celery-idempotency relies on is all there, in the installed
Celery, with the parameters we call or override it with (celery_compat.py).

Each Celery of the test matrix (noxfile.py) runs this file: a release that renames or changes
one of these names fails here, with the name and what stops working, instead of silently
disabling a worker hook.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import celery
import pytest
from celery.result import AsyncResult
from celery.worker.request import Request

from celery_idempotency import IdempotentTask, celery_compat
from celery_idempotency.celery_compat import (
    OVERRIDDEN_PUBLIC,
    PRIVATE_SURFACE,
    PrivateName,
    problem_with,
)
from celery_idempotency.worker import IdempotentRequest
from tests.support.apps import eager_app

PACKAGE = Path(celery_compat.__file__).resolve().parent
ALL = (*PRIVATE_SURFACE, *OVERRIDDEN_PUBLIC)


@pytest.mark.parametrize("item", ALL, ids=[item.where for item in ALL])
def test_installed_celery_has_it_with_the_expected_parameters(item: PrivateName) -> None:
    problem = problem_with(item)
    assert problem is None, (
        f"{problem}. Adapt celery_idempotency/celery_compat.py (and the hook that uses it) to "
        f"Celery {celery.__version__}, or exclude that release in pyproject.toml.")


def test_retry_on_worker_lost_hook_is_detected_exactly_where_celery_has_it() -> None:
    # Celery 5.7 added task_retry_on_worker_lost; from 5.7 on the hook must be there (a rename
    # must not just switch the feature off), and before 5.7 we must not override it.
    assert celery_compat.RETRIES_ON_WORKER_LOST is (celery_compat.CELERY_VERSION >= (5, 7))
    assert ("_retry_worker_lost" in vars(IdempotentRequest)) is \
        celery_compat.RETRIES_ON_WORKER_LOST


def test_every_request_method_we_override_is_guarded() -> None:
    """A new override of a Celery Request method must be added to celery_compat's lists."""
    guarded = {item.name for item in ALL if item.owner is Request}
    overridden = {name for name, value in vars(IdempotentRequest).items()
                  if callable(value) and hasattr(Request, name)}
    assert overridden, "IdempotentRequest overrides nothing: the check below would be empty"
    assert overridden <= guarded, (
        f"IdempotentRequest overrides {sorted(overridden - guarded)} of Celery's Request "
        "without listing them in celery_compat.PRIVATE_SURFACE / OVERRIDDEN_PUBLIC")


def test_overrides_keep_celerys_parameters() -> None:
    for item in ALL:
        ours = vars(IdempotentRequest).get(item.name)
        if item.owner is Request and callable(ours) and item.parameters is not None:
            assert celery_compat._parameters(ours) == item.parameters, item.where


def test_no_other_module_reaches_into_celery_privately() -> None:
    """Private Celery names appear only in celery_compat.py, apart from the overrides
    themselves (``def name(`` and ``super().name(``), which must keep Celery's name."""
    names = "|".join(re.escape(item.name) for item in PRIVATE_SURFACE)
    use = re.compile(rf"(def |super\(\)\.)?\b({names})\b")
    private_module = re.compile(r"^\s*(?:from|import)\s+(?:celery|kombu|billiard)[\w.]*\._\w*",
                                re.MULTILINE)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "celery_compat.py":
            continue
        text = path.read_text()
        offenders += [f"{path.name}: {m.group(0).strip()}" for m in private_module.finditer(text)]
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(match.group(1) is None for match in use.finditer(code)):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "private Celery names used outside celery_compat.py:\n" + \
        "\n".join(offenders)


def test_the_check_names_a_missing_attribute() -> None:
    class Renamed:
        def _announce_revoked_v2(self, reason: str) -> None: ...

    problem = problem_with(PrivateName(Renamed, "_announce_revoked", ("reason",), "X works"))
    assert problem is not None
    assert "has no" in problem and "Renamed._announce_revoked" in problem
    assert "X works" in problem


def test_the_check_names_a_changed_signature() -> None:
    class Changed:
        def _announce_revoked(self, reason: str, terminated: bool) -> None: ...

    item = PrivateName(Changed, "_announce_revoked",
                       ("reason", "terminated", "signum", "expired"), "X works")
    problem = problem_with(item)
    assert problem is not None
    assert "expected (reason, terminated, signum, expired), found (reason, terminated)" \
        in problem


def test_the_check_ignores_what_the_installed_celery_is_too_old_for() -> None:
    class Old:
        pass

    future = (celery_compat.CELERY_VERSION[0] + 1, 0)
    assert problem_with(PrivateName(Old, "_later", (), "later", since=future)) is None


def test_a_renamed_hook_warns_at_import() -> None:
    """In a user's worker, not only in our tests: importing the package with a Celery that
    lacks a hook warns, naming the hook and what stops working."""
    code = ("import celery.worker.request as r; del r.Request._announce_revoked; "
            "import celery_idempotency")
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "RuntimeWarning: celery-idempotency: Celery" in done.stderr
    assert "Request._announce_revoked" in done.stderr
    assert "revoked or expired task gives its key up" in done.stderr


def test_async_result_properties_read_through_get_task_meta() -> None:
    """IdempotentResult overrides _get_task_meta so that .state/.result/.ready() read the key
    store: Celery's public properties must still go through it."""

    class Fixed(AsyncResult):  # type: ignore[misc]
        def _get_task_meta(self) -> dict[str, object]:
            return {"task_id": self.id, "status": "SUCCESS", "result": 42, "traceback": None,
                    "children": [], "date_done": None}

    handle = Fixed("some-id", app=celery.Celery(set_as_current=False))
    assert handle.state == "SUCCESS"
    assert handle.result == 42
    assert handle.ready() is True
    assert celery_compat.task_meta(handle)["result"] == 42


def test_push_request_flag_matches_what_the_installed_celery_does() -> None:
    """Celery 5.4's Task.push_request starts a bare request; 5.5+ keeps the current fields."""
    app = celery.Celery("compat", set_as_current=False)

    @app.task(shared=False, name="tests.compat.plain")
    def plain() -> None: ...

    plain.push_request(id="outer-id")
    try:
        plain.push_request(args=(), kwargs={})
        try:
            kept = plain.request.id == "outer-id"
        finally:
            plain.pop_request()
    finally:
        plain.pop_request()
    assert kept is celery_compat.PUSH_REQUEST_KEEPS_REQUEST


def test_the_task_body_sees_its_own_request_on_every_celery() -> None:
    app = eager_app("compat", propagate=True)

    @app.task(shared=False, base=IdempotentTask, bind=True, name="tests.compat.body")
    def body(self: Any) -> dict[str, Any]:
        return {"id": self.request.id, "fence": self.request.idempotency_fence,
                "key": (self.request.headers or {}).get("idempotency_key")
                or getattr(self.request, "idempotency_key", None)}

    handle = body.apply_async(idempotency_key="compat-key")
    seen = handle.get(timeout=5)
    assert seen["id"] == handle.id
    assert seen["fence"] is not None  # set once the key is claimed
    assert seen["key"] == "compat-key"
