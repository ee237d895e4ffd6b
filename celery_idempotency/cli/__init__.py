"""Inspecting keys from the command line: `celery -A proj idempotency <command>`
and `celery-idempotency --store-url URL <command>`, with `list`, `show`, `stats`, `release`
and `purge`.

Modules: `groups` (the two entry points), `commands` (the commands), `query` (what they do to
the store), `render` (tables and JSON), `session` (which store; exit codes; error messages),
`durations`, `progress`.
"""

from .groups import idempotency, main
from .session import EXIT_NOT_FOUND, EXIT_OK, EXIT_REFUSED, EXIT_STORE, EXIT_USAGE

__all__ = [
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_STORE",
    "EXIT_USAGE",
    "idempotency",
    "main",
]
