"""``python manage.py idempotency <command>``: the commands of ``celery -A proj idempotency``
(list, show, stats, release, purge; the same options, output and exit codes), on the store of
the project's Celery app. The command line goes to the click group unchanged, so there is one
implementation of each command (celery_idempotency.cli)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from celery.app import app_or_default
from django.core.management.base import (  # type: ignore[import-untyped,unused-ignore]
    BaseCommand,
    CommandError,
)

from ....cli import idempotency


class Command(BaseCommand):  # type: ignore[misc]  # BaseCommand is untyped: Any
    help = ("Inspect and manage idempotency keys on the store of the project's Celery app: "
            "list, show, stats, release, purge (as `celery -A proj idempotency`).")

    def run_from_argv(self, argv: list[str]) -> None:
        # Django's own argument parsing is skipped: click parses, prints help and errors, and
        # exits with the command's code (0 ok, 1 not found, 2 usage, 3 store, 4 refused).
        # The project's Celery app is the current one once Django has loaded the project
        # (its celery.py, imported by the project package's __init__).
        idempotency.main(args=argv[2:], prog_name=f"{Path(argv[0]).name} {argv[1]}",
                         obj=SimpleNamespace(app=app_or_default()))

    def handle(self, *args: Any, **options: Any) -> None:
        raise CommandError("run `manage.py idempotency ...` from the command line; from code, "
                           "use celery_idempotency.cli.query")
