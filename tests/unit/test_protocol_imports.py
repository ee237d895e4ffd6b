"""The idempotency protocol (`celery_idempotency.protocol`) is plain code: it imports nothing
from Celery (or its billiard/kombu), which `IdempotentTask` and `IdempotentRequest` adapt to it.

Celery reaches the protocol only through the modules it uses for data, each for a stated reason:
`outcomes` and `steps` encode with kombu's serializer registry (the bytes Celery's own result
backend would hold, under the same ``accept`` list) and never replay Celery's control-flow
exceptions; `config` builds the settings object with Celery's ``symbol_by_name``. A new Celery
dependency anywhere else in the protocol's imports fails here, so it is a decision, not drift."""

from __future__ import annotations

import ast
from pathlib import Path

import celery_idempotency
import celery_idempotency.protocol as protocol

CELERY_PACKAGES = {"celery", "billiard", "kombu"}
PACKAGE = Path(celery_idempotency.__file__).resolve().parent
# The package's modules allowed to import Celery on the protocol's import path, and why (above).
CELERY_CODECS = {"celery_idempotency.config", "celery_idempotency.outcomes",
                 "celery_idempotency.steps"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(the package's modules, the other modules) that module ``name`` imports itself."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inner: set[str] = set()
    outer: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            outer.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("celery_idempotency."):
                module = node.module
            else:
                outer.add(node.module or "")
                continue
            candidates = {module, *(f"{module}.{alias.name}" for alias in node.names)}
            inner.update(candidates & MODULES.keys())
    parts = name.split(".")  # importing a submodule runs its packages' __init__ too
    inner.update(".".join(parts[:end]) for end in range(2, len(parts)))
    return inner, outer


def _imports_celery(name: str) -> bool:
    return any(module.split(".")[0] in CELERY_PACKAGES for module in _imports(name)[1])


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


def test_celery_reaches_the_protocol_only_through_its_codecs_and_config() -> None:
    seen: set[str] = set()
    todo = ["celery_idempotency.protocol"]
    while todo:
        name = todo.pop()
        if name in seen or name == "celery_idempotency":  # the public facade imports it all
            continue
        seen.add(name)
        todo.extend(_imports(name)[0])
    assert {"celery_idempotency.outcomes", "celery_idempotency.store.base"} <= seen
    assert {name for name in seen if _imports_celery(name)} <= CELERY_CODECS
