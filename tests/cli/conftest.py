"""Fixtures for the CLI tests: the session's private redis-server (db 9, flushed around every
test), the memory store, in-process invocation with click's CliRunner and real subprocesses of
both entry points, as a user runs them."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from celery_idempotency import KeyStore, MemoryKeyStore, RecordRef, RedisKeyStore
from celery_idempotency.cli import main
from celery_idempotency.store import ResultPayload
from tests.support.records import DAY_MS
from tests.support.services import RedisServer

DB = 9  # the CLI tests' own database on the session's redis-server
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis_server.client(db=DB)
    client.flushdb()
    yield redis_server.url(DB)
    client.flushdb()
    client.close()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[KeyStore]:
    """Commands are driven in-process against both stores."""
    if request.param == "memory":
        yield MemoryKeyStore(prefix="idem:")
        return
    yield from _redis_store(redis_server)


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisKeyStore]:
    """For what only Redis can do (e.g. hold a key of another type under the prefix)."""
    yield from _redis_store(redis_server)


def _redis_store(redis_server: RedisServer) -> Iterator[RedisKeyStore]:
    client = redis_server.client(db=DB)
    client.flushdb()
    store = RedisKeyStore(client, prefix="idem:")
    yield store
    client.flushdb()
    store.close()


def runner() -> CliRunner:
    # click < 8.2 mixes stderr into stdout unless told not to; 8.2+ always keeps both.
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    return CliRunner()


def invoke(store: KeyStore, *args: str, input: str | None = None,
           group: click.Group = main, obj: Any = None) -> Result:
    """`celery-idempotency --store-url ... <args>` in-process, on ``store``."""
    url = "memory://" if isinstance(store, MemoryKeyStore) else "redis://test"
    argv = ["--store-url", url, *args] if group is main else list(args)
    return runner().invoke(group, argv, input=input, obj=store if obj is None else obj,
                           catch_exceptions=False)


# -- seeding through the store API ---------------------------------------------------------------

def reserve(store: KeyStore, key: str, scope: str = "shop.charge", task_id: str | None = None,
            ttl_ms: int = DAY_MS) -> None:
    store.reserve(RecordRef(scope, key), task_id=task_id or f"task-{key}", fingerprint="fp",
                  task_name=scope, ttl_ms=ttl_ms)


def claim(store: KeyStore, key: str, scope: str = "shop.charge", *, owner: str = "w1",
          lease_ms: int = 600_000, task_id: str | None = None) -> int:
    """Claim the key; returns the claim's fence."""
    return store.claim(RecordRef(scope, key), task_id=task_id or f"task-{key}", owner=owner,
                       fingerprint="fp", task_name=scope, lease_ms=lease_ms,
                       ttl_ms=DAY_MS).fence


def succeed(store: KeyStore, key: str, scope: str = "shop.charge", *, data: bytes = b'{"ok":1}',
            content_type: str = "application/json") -> None:
    fence = claim(store, key, scope, owner="w-done")
    encoding = "utf-8" if content_type == "application/json" else "binary"
    store.complete(RecordRef(scope, key), owner="w-done", fence=fence, ttl_ms=DAY_MS,
                   result=ResultPayload(data, content_type, encoding, "stored"))


def fail(store: KeyStore, key: str, scope: str = "shop.charge", *,
         retryable: bool = False) -> None:
    claim(store, key, scope, owner="w-failed")
    error = '{"type":"shop.Declined","message":"card declined","args":["card declined"]}'
    store.fail(RecordRef(scope, key), owner="w-failed", error=error, retryable=retryable,
               ttl_ms=DAY_MS)


# -- subprocesses --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def _run(argv: list[str], env: dict[str, str] | None, input: str | None) -> Run:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    done = subprocess.run(argv, input=input, capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=120)
    return Run(done.returncode, done.stdout, done.stderr)


def console_script(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the package (pip install -e .)")
    return str(path)


def run_celery(*args: str, store_url: str | None, env: dict[str, str] | None = None,
               input: str | None = None) -> Run:
    """`celery -A tests.cli.app idempotency <args>`; the app's store is ``store_url``."""
    extra = {"CLI_STORE_URL": store_url} if store_url else {}
    environment = {**extra, **(env or {})}
    if not store_url:
        environment["CLI_STORE_URL"] = ""
    return _run([console_script("celery"), "-A", "tests.cli.app", "idempotency", *args],
                environment, input)


def run_standalone(*args: str, input: str | None = None) -> Run:
    """`celery-idempotency <args>`."""
    return _run([console_script("celery-idempotency"), *args], None, input)
