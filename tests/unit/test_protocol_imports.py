"""The idempotency protocol (`celery_idempotency.protocol`) is plain code: it imports nothing
from Celery (or its billiard/kombu), which `IdempotentTask` and `IdempotentRequest` adapt to it."""

from __future__ import annotations

import ast
from pathlib import Path

import celery_idempotency.protocol as protocol

CELERY_PACKAGES = {"celery", "billiard", "kombu"}


def test_the_protocol_module_imports_nothing_from_celery() -> None:
    tree = ast.parse(Path(protocol.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module)
    assert not {name for name in imported if name.split(".")[0] in CELERY_PACKAGES}
    assert imported  # the check saw the module's imports
