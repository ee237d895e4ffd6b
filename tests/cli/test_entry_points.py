"""Both entry points run as a user runs them: `celery -A tests.cli.app idempotency ...` (the
``celery.commands`` plugin, app from -A) and `celery-idempotency --store-url ...`, in real
subprocesses against a real Redis, with keys made by real tasks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from celery_idempotency import KeyStore, RecordRef, open_store
from celery_idempotency.cli import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STORE,
    EXIT_USAGE,
)
from tests.cli.app import Declined, make_app
from tests.cli.conftest import claim, reserve, run_celery, run_standalone
from tests.support.services import free_port


@pytest.fixture
def seeded(redis_url: str) -> Iterator[KeyStore]:
    """Keys as the library makes them: eager tasks publish and run them (a succeeded charge, a
    cached declined charge, a receipt under its own scope with the same key as a charge), plus
    claims left by workers, one of them dead (stale), and a reservation."""
    app = make_app(redis_url)
    charge, receipt = app.tasks["shop.charge"], app.tasks["shop.receipt"]
    charge.apply_async((7,), idempotency_key="order-7").get()
    with pytest.raises(Declined):
        charge.apply_async((8,), {"amount": -1}, idempotency_key="order-8")
    receipt.apply_async((7,), idempotency_key="order-7").get()
    store = open_store(redis_url)
    claim(store, "order-9", owner="dead-worker", lease_ms=1)
    claim(store, "order-10", owner="busy-worker", lease_ms=600_000)
    reserve(store, "order-11")
    time.sleep(0.01)
    yield store
    store.close()


def json_lines(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    rows = [json.loads(line) for line in text.splitlines()]
    return {(row["scope"], row["key"]): row for row in rows}


def test_celery_plugin_lists_shows_and_releases_keys(seeded: KeyStore, redis_url: str) -> None:
    listed = run_celery("list", "--json", store_url=redis_url)
    assert listed.code == EXIT_OK, listed.err
    rows = json_lines(listed.out)
    assert {key: row["state"] for key, row in rows.items()} == {
        ("shop.charge", "order-7"): "succeeded", ("shop.charge", "order-8"): "failed",
        ("receipts", "order-7"): "succeeded", ("shop.charge", "order-9"): "started",
        ("shop.charge", "order-10"): "started", ("shop.charge", "order-11"): "pending"}
    assert [key for key, row in rows.items() if row["stale"]] == [("shop.charge", "order-9")]

    table = run_celery("list", "--state", "started", store_url=redis_url).out.splitlines()
    assert table[0].split()[0] == "STATE" and len(table) == 3
    assert [line.split()[-1] for line in table if "STALE" in line] == ["order-9"]

    ambiguous = run_celery("show", "order-7", store_url=redis_url)
    assert ambiguous.code == EXIT_USAGE and "receipts, shop.charge" in ambiguous.err
    shown = run_celery("show", "order-7", "--scope", "shop.charge", "--json", store_url=redis_url)
    assert json.loads(shown.out)["result"] == {"order_id": 7, "amount": 100, "charged": True}
    declined = run_celery("show", "order-8", store_url=redis_url)
    assert "tests.cli.app.Declined: order 8: negative amount" in declined.out

    refused = run_celery("release", "order-10", store_url=redis_url)
    assert refused.code == EXIT_REFUSED and "live claim" in refused.err and refused.out == ""
    assert run_celery("release", "order-9", store_url=redis_url).code == EXIT_OK
    assert run_celery("release", "order-10", "--force", store_url=redis_url).code == EXIT_OK
    assert seeded.get(RecordRef("shop.charge", "order-9")) is None
    assert seeded.get(RecordRef("shop.charge", "order-10")) is None


def test_standalone_command_stats_and_purge(seeded: KeyStore, redis_url: str) -> None:
    stats = run_standalone("--store-url", redis_url, "stats", "--json")
    assert stats.code == EXIT_OK, stats.err
    document = json.loads(stats.out)
    assert document["records"] == 6 and document["stale_leases"] == 1
    assert document["states"] == {"pending": 1, "started": 2, "succeeded": 2, "failed": 1}
    assert document["store"] == redis_url and document["memory_bytes"] > 0

    declined = run_standalone("--store-url", redis_url, "purge", "--state", "failed",
                              "--older-than", "0s", input="n\n")
    assert declined.code == EXIT_REFUSED
    purged = run_standalone("--store-url", redis_url, "purge", "--state", "failed",
                            "--state", "started", "--older-than", "0s", "--yes", "--json")
    assert purged.code == EXIT_OK, purged.err
    assert json.loads(purged.out) | {"scanned": 0} == {
        "dry_run": False, "matched": 2, "deleted": 2, "changed": 0, "skipped_live": 1,
        "undecodable": 0, "foreign": 0, "scanned": 0}
    assert seeded.get(RecordRef("shop.charge", "order-8")) is None  # failed
    assert seeded.get(RecordRef("shop.charge", "order-9")) is None  # stale claim
    assert seeded.get(RecordRef("shop.charge", "order-10")) is not None  # live claim

    missing = run_standalone("--store-url", redis_url, "show", "order-404")
    assert missing.code == EXIT_NOT_FOUND and missing.out == ""
    assert "no record for key 'order-404' in any scope" in missing.err


def test_both_entry_points_honour_the_key_prefix(redis_url: str) -> None:
    store = open_store(redis_url, prefix="shop:")
    reserve(store, "order-1")
    store.close()
    assert run_standalone("--store-url", redis_url, "list", "--json").out == ""
    found = run_standalone("--store-url", redis_url, "--prefix", "shop:", "list", "--json")
    assert [row["key"] for row in json_lines(found.out).values()] == ["order-1"]
    by_app = run_celery("list", "--json", store_url=redis_url, env={"CLI_KEY_PREFIX": "shop:"})
    assert [row["key"] for row in json_lines(by_app.out).values()] == ["order-1"]
    overridden = run_celery("--prefix", "shop:", "list", "--json", store_url=redis_url)
    assert [row["key"] for row in json_lines(overridden.out).values()] == ["order-1"]


def test_unreachable_store_is_a_clean_error_naming_the_url() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    for result in (run_standalone("--store-url", url, "list"),
                   run_celery("stats", store_url=url)):
        assert result.code == EXIT_STORE, result.err
        assert "cannot reach the idempotency store at redis://:***@127.0.0.1:" in result.err
        assert "s3cret" not in result.err and "Traceback" not in result.err
        assert result.out == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--store-url", "mongodb://x/0", "list"], "unsupported idempotency store URL scheme"),
    (["--store-url", "redis://localhost:port/0", "list"], "bad idempotency store URL"),
    (["--store-url", "no-scheme", "list"], "must be a URL"),
    (["list"], "Missing option '--store-url'"),
])
def test_bad_store_urls_are_usage_errors(args: list[str], message: str) -> None:
    result = run_standalone(*args)
    assert result.code == EXIT_USAGE and message in result.err
    assert "Traceback" not in result.err


def test_celery_app_without_a_store_url_is_a_usage_error() -> None:
    result = run_celery("list", store_url=None)
    assert result.code == EXIT_USAGE and "Traceback" not in result.err
    assert "'clitest' has no idempotency_store_url" in result.err


def test_help_lists_the_commands() -> None:
    for result in (run_standalone("--help"), run_celery("--help", store_url=None)):
        assert result.code == EXIT_OK
        for command in ("list", "show", "stats", "release", "purge"):
            assert f"  {command} " in result.out
