"""The commands driven in-process (click's CliRunner) against the memory and the Redis store:
what each shows, its filters, its JSON, its refusals and its exit codes."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from celery_idempotency import KeyState, KeyStore, MemoryKeyStore, RecordRef, RedisKeyStore
from celery_idempotency.cli import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STORE,
    EXIT_USAGE,
    idempotency,
)
from celery_idempotency.cli.render import TABLE_COLUMNS
from tests.cli.app import make_app
from tests.cli.conftest import claim, fail, invoke, reserve, succeed
from tests.support.records import write_raw


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def table(text: str) -> dict[str, dict[str, str]]:
    """A `list` table as {key: {column: cell}}, cut at the header's column offsets."""
    header, *lines = text.splitlines()
    names = list(TABLE_COLUMNS)
    starts = [header.index(name) for name in names]
    rows = {}
    for line in lines:
        cells = [line[start:end].strip() for start, end in
                 zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[-1]] = dict(zip(names, cells, strict=True))
    return rows


def by_key(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in rows}


def seed_one_of_each(store: KeyStore) -> None:
    reserve(store, "order-1")
    claim(store, "order-2")
    succeed(store, "order-3")
    fail(store, "order-4", scope="receipts")


def state_of(store: KeyStore, key: str, scope: str = "shop.charge") -> KeyState | None:
    record = store.get(RecordRef(scope, key))
    return record.state if record else None


# -- list ----------------------------------------------------------------------------------------

def test_list_shows_every_key_with_state_scope_task_age_lease_and_ttl(store: KeyStore) -> None:
    seed_one_of_each(store)
    result = invoke(store, "list")
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stdout.split()[:8] == ["STATE", "AGE", "LEASE", "TTL", "TASK", "ID", "SCOPE",
                                         "KEY"]
    rows = table(result.stdout)
    assert set(rows) == {"order-1", "order-2", "order-3", "order-4"}
    assert [rows[f"order-{i}"]["STATE"] for i in range(1, 5)] == [
        "pending", "started", "succeeded", "failed"]
    # alive: 10 minutes, less the time since the claim (none, when it is the same millisecond)
    assert rows["order-2"]["LEASE"] == "in 10m" or rows["order-2"]["LEASE"].startswith("in 9m")
    assert rows["order-1"]["LEASE"] == "-"
    assert rows["order-4"]["SCOPE"] == "receipts"
    assert rows["order-3"]["TASK ID"] == "task-order-3"
    assert all(row["TTL"] in ("1d", "23h59m") for row in rows.values())  # TTL of a day
    # Just seeded: an age in ms or s (not a timing assertion: a loaded machine takes seconds).
    assert all(re.fullmatch(r"\d+(ms|s)", row["AGE"]) for row in rows.values())


def test_list_marks_stale_claims(store: KeyStore) -> None:
    claim(store, "stale", lease_ms=1)
    claim(store, "alive", lease_ms=600_000)
    reserve(store, "waiting")
    time.sleep(0.01)
    rows = by_key(json_lines(invoke(store, "list", "--json").stdout))
    assert rows["stale"]["stale"] is True and rows["stale"]["lease_left_s"] < 0
    assert rows["alive"]["stale"] is False and rows["alive"]["lease_left_s"] > 500
    assert rows["waiting"]["stale"] is False and rows["waiting"]["lease_left_s"] is None
    rows_shown = table(invoke(store, "list").stdout)
    assert [key for key, row in rows_shown.items() if "STALE" in row["LEASE"]] == ["stale"]
    assert rows_shown["stale"]["LEASE"].endswith(" ago")
    only_stale = json_lines(invoke(store, "list", "--stale", "--json").stdout)
    assert [row["key"] for row in only_stale] == ["stale"]


def test_list_filters_by_state_scope_and_key_pattern(store: KeyStore) -> None:
    for i in range(1, 13):
        reserve(store, f"order-{i}")
    fail(store, "order-1", scope="receipts")
    fail(store, "order-2", scope="receipts")
    fail(store, "order-13")

    def keys(*args: str) -> set[str]:
        return {row["key"] for row in json_lines(invoke(store, "list", "--json", *args).stdout)}

    assert keys("--state", "failed") == {"order-1", "order-2", "order-13"}
    assert keys("--state", "failed", "--scope", "receipts") == {"order-1", "order-2"}
    assert keys("--scope", "shop.charge", "--match", "order-1?") == {
        "order-10", "order-11", "order-12", "order-13"}
    assert keys("--match", "order-[23]") == {"order-2", "order-3"}
    assert keys("--state", "pending", "--state", "failed", "--match", "*-1") == {"order-1"}
    assert len(invoke(store, "list", "--json", "--limit", "5").stdout.splitlines()) == 5


def test_match_patterns_are_the_users_keys_not_redis_globs(store: KeyStore) -> None:
    reserve(store, "a*b")
    reserve(store, "axb")
    assert {row["key"] for row in json_lines(invoke(store, "list", "--json", "--match",
                                                    "a[*]b").stdout)} == {"a*b"}


def test_list_json_is_one_object_per_line(store: KeyStore) -> None:
    seed_one_of_each(store)
    rows = json_lines(invoke(store, "list", "--json").stdout)
    assert len(rows) == 4
    row = by_key(rows)["order-4"]
    assert (row["scope"], row["state"], row["task_id"], row["retryable"]) == (
        "receipts", "failed", "task-order-4", False)
    assert row["created"].endswith("Z") and row["age_s"] >= 0 and row["ttl_s"] > 86_000
    assert row["store_key"] == RecordRef("receipts", "order-4").store_key("idem:")


def test_list_of_an_empty_store_prints_nothing_and_succeeds(store: KeyStore) -> None:
    result = invoke(store, "list")
    assert (result.exit_code, result.stdout) == (EXIT_OK, "")
    assert "no matching records" in result.stderr
    assert invoke(store, "list", "--json").stdout == ""


def test_list_skips_an_undecodable_record_with_a_warning(store: KeyStore) -> None:
    reserve(store, "good")
    write_raw(store, RecordRef("s", "bad"), {"k": b"bad", "st": b"exploded"})
    result = invoke(store, "list", "--json")
    assert result.exit_code == EXIT_OK
    assert [row["key"] for row in json_lines(result.stdout)] == ["good"]
    assert "skipped 1 undecodable record" in result.stderr and "idem:{" in result.stderr


# -- show ----------------------------------------------------------------------------------------

def test_show_prints_the_whole_record_with_the_result_decoded(store: KeyStore) -> None:
    succeed(store, "order-3", data=b'{"order_id":3,"charged":true}')
    result = invoke(store, "show", "order-3")
    assert result.exit_code == EXIT_OK
    text = result.stdout
    for expected in ("key:         order-3", "scope:       shop.charge", "state:       succeeded",
                     "task id:     task-order-3", '"charged": true'):
        assert expected in text
    assert "ttl:         1d\n" in text or "ttl:         23h59m\n" in text
    document = json.loads(invoke(store, "show", "order-3", "--json").stdout)
    assert document["result"] == {"order_id": 3, "charged": True}
    record = store.get(RecordRef("shop.charge", "order-3"))
    assert record is not None and record.fence >= 1
    # A succeeded record keeps neither its owner token nor its creation time: its age counts
    # from its completion.
    assert (document["owner"], document["fingerprint"], document["fence"]) == (
        None, "fp", record.fence)
    assert document["created"] is None and document["updated"].endswith("Z")
    assert document["age_s"] is not None and document["age_s"] >= 0
    assert "created:     - (not kept once succeeded)" in text and "owner:       -\n" in text


def test_a_succeeded_records_age_counts_from_its_completion(store: KeyStore) -> None:
    reserve(store, "old")
    time.sleep(0.05)
    succeed(store, "old")
    # Timestamps are in milliseconds: without a pause, "old" completing and "new" being reserved
    # can share one, and then either may come first in the scan (a CI run saw exactly that).
    time.sleep(0.02)
    reserve(store, "new")
    rows = by_key(json_lines(invoke(store, "list", "--json").stdout))
    assert rows["old"]["created"] is None and rows["new"]["created"].endswith("Z")
    # "old" succeeded before "new" was reserved: the older of the two, by its completion.
    assert rows["old"]["age_s"] >= rows["new"]["age_s"]
    assert re.fullmatch(r"\d+(ms|s)", table(invoke(store, "list").stdout)["old"]["AGE"])
    document = json.loads(invoke(store, "stats", "--json").stdout)
    assert document["oldest"]["key"] == "old" and document["oldest"]["created"] is None
    assert document["oldest"]["since"].endswith("Z") and document["oldest"]["age_s"] >= 0
    assert "oldest:      'old' (scope 'shop.charge', succeeded), succeeded " in \
        invoke(store, "stats").stdout


def test_show_prints_a_cached_error(store: KeyStore) -> None:
    fail(store, "order-4", retryable=True)
    assert "error:       shop.Declined: card declined" in invoke(store, "show", "order-4").stdout
    document = json.loads(invoke(store, "show", "order-4", "--json").stdout)
    assert document["error"]["type"] == "shop.Declined" and document["retryable"] is True
    assert document["result"] is None


def test_show_marks_a_stale_claim(store: KeyStore) -> None:
    claim(store, "order-2", lease_ms=1)
    time.sleep(0.01)
    assert "lease:       STALE: expired" in invoke(store, "show", "order-2").stdout


def test_show_never_decodes_a_pickled_result(store: KeyStore) -> None:
    # A pickle that would run code when loaded: the CLI must not load it.
    payload = b"cos\nsystem\n(S'echo pwned'\ntR."
    succeed(store, "order-5", data=payload, content_type="application/x-python-serialize")
    document = json.loads(invoke(store, "show", "order-5", "--json").stdout)
    assert document["result"] is None
    assert "application/x-python-serialize" in document["result_note"]
    assert "not decoded" in invoke(store, "show", "order-5").stdout


def test_show_finds_the_scope_or_says_the_key_is_ambiguous_or_unknown(store: KeyStore) -> None:
    reserve(store, "only-here", scope="receipts")
    reserve(store, "twice", scope="receipts")
    reserve(store, "twice", scope="shop.charge")
    assert json.loads(invoke(store, "show", "only-here", "--json").stdout)["scope"] == "receipts"
    ambiguous = invoke(store, "show", "twice")
    assert ambiguous.exit_code == EXIT_USAGE and ambiguous.stdout == ""
    assert "2 scopes (receipts, shop.charge)" in ambiguous.stderr and "--scope" in ambiguous.stderr
    scoped = invoke(store, "show", "twice", "--scope", "shop.charge", "--json")
    assert json.loads(scoped.stdout)["scope"] == "shop.charge"
    unknown = invoke(store, "show", "nope")
    assert unknown.exit_code == EXIT_NOT_FOUND
    assert "no record for key 'nope' in any scope" in unknown.stderr
    assert "prefix 'idem:'" in unknown.stderr
    wrong_scope = invoke(store, "show", "only-here", "--scope", "shop.charge")
    assert wrong_scope.exit_code == EXIT_NOT_FOUND
    assert "in scope 'shop.charge'" in wrong_scope.stderr


def test_show_of_an_undecodable_record_names_it(store: KeyStore) -> None:
    ref = RecordRef("s", "bad")
    write_raw(store, ref, {"k": b"bad", "s": b"s", "st": b"exploded", "t": b"t", "fp": b"f"})
    result = invoke(store, "show", "bad", "--scope", "s")
    assert result.exit_code == EXIT_STORE
    assert ref.store_key("idem:") in result.stderr and "exploded" in result.stderr


# -- release -------------------------------------------------------------------------------------

def test_release_refuses_a_live_claim_and_force_releases_it(store: KeyStore) -> None:
    claim(store, "busy", owner="worker-7")
    refused = invoke(store, "release", "busy")
    assert refused.exit_code == EXIT_REFUSED and refused.stdout == ""
    assert "live claim" in refused.stderr and "worker-7" in refused.stderr
    assert "--force" in refused.stderr
    assert state_of(store, "busy") is KeyState.STARTED
    forced = invoke(store, "release", "busy", "--force", "--json")
    assert forced.exit_code == EXIT_OK
    assert json.loads(forced.stdout) == {
        "released": True, "key": "busy", "scope": "shop.charge", "state": "started",
        "stale": False, "task_id": "task-busy", "forced": True}
    assert state_of(store, "busy") is None


def test_release_frees_stale_claims_pending_and_failed_records(store: KeyStore) -> None:
    claim(store, "stale", lease_ms=1)
    reserve(store, "pending")
    fail(store, "failed")
    time.sleep(0.01)
    stale = invoke(store, "release", "stale")
    assert stale.exit_code == EXIT_OK and "it was a stale claim" in stale.stdout
    for key in ("pending", "failed"):
        result = invoke(store, "release", key)
        assert result.exit_code == EXIT_OK and f"it was {key}" in result.stdout
    assert invoke(store, "list", "--json").stdout == ""


def test_release_keeps_a_cached_result_unless_forced(store: KeyStore) -> None:
    succeed(store, "done")
    refused = invoke(store, "release", "done")
    assert refused.exit_code == EXIT_REFUSED and "cached result" in refused.stderr
    assert state_of(store, "done") is KeyState.SUCCEEDED
    assert invoke(store, "release", "done", "--force").exit_code == EXIT_OK
    assert state_of(store, "done") is None


def test_release_leaves_a_record_that_changed_after_it_was_read(
        store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    claim(store, "racy", lease_ms=1, owner="dead-worker")
    time.sleep(0.01)
    original = store.delete_if_unchanged

    def taken_over_first(record: Any) -> bool:
        # A redelivered message takes the stale claim over between read and delete.
        claim(store, "racy", owner="new-worker", task_id="task-new")
        return original(record)

    monkeypatch.setattr(store, "delete_if_unchanged", taken_over_first)
    result = invoke(store, "release", "racy")
    assert result.exit_code == EXIT_REFUSED
    assert "changed after it was read" in result.stderr and "task-new" in result.stderr
    record = store.get(RecordRef("shop.charge", "racy"))
    assert record is not None and record.owner == "new-worker"


def test_release_of_an_unknown_key_exits_1(store: KeyStore) -> None:
    result = invoke(store, "release", "nope", "--scope", "shop.charge")
    assert result.exit_code == EXIT_NOT_FOUND and "no record for key 'nope'" in result.stderr


# -- purge ---------------------------------------------------------------------------------------

def test_purge_with_yes_deletes_old_records_in_that_state_only(store: KeyStore) -> None:
    fail(store, "old-failed")
    reserve(store, "old-pending")
    claim(store, "old-live-claim")
    claim(store, "old-stale-claim", lease_ms=1)
    time.sleep(0.3)
    fail(store, "new-failed")
    result = invoke(store, "purge", "--state", "failed", "--state", "started",
                    "--older-than", "200ms", "--yes")
    assert result.exit_code == EXIT_OK, result.stderr
    assert result.stdout.strip() == "deleted 2 records; skipped 1 live claim"
    left = {row["key"] for row in json_lines(invoke(store, "list", "--json").stdout)}
    assert left == {"old-pending", "old-live-claim", "new-failed"}


def test_purge_asks_first_and_deletes_nothing_when_declined(store: KeyStore) -> None:
    fail(store, "f1")
    fail(store, "f2")
    declined = invoke(store, "purge", "--state", "failed", "--older-than", "0s", input="n\n")
    assert declined.exit_code == EXIT_REFUSED and "not confirmed" in declined.stderr
    assert "Delete failed records last changed more than 0ms ago" in declined.stderr
    no_input = invoke(store, "purge", "--state", "failed", "--older-than", "0s", input="")
    assert no_input.exit_code == EXIT_REFUSED
    assert state_of(store, "f1") is KeyState.FAILED
    accepted = invoke(store, "purge", "--state", "failed", "--older-than", "0s", "--json",
                      input="y\n")
    assert accepted.exit_code == EXIT_OK
    assert json.loads(accepted.stdout)["deleted"] == 2
    assert state_of(store, "f1") is None


def test_purge_dry_run_counts_and_deletes_nothing(store: KeyStore) -> None:
    for i in range(3):
        reserve(store, f"p{i}", scope="receipts")
    reserve(store, "other-scope")
    result = invoke(store, "purge", "--state", "pending", "--older-than", "0s", "--scope",
                    "receipts", "--dry-run", "--json")
    assert json.loads(result.stdout) | {"scanned": 0} == {
        "dry_run": True, "matched": 3, "deleted": 0, "changed": 0, "skipped_live": 0,
        "undecodable": 0, "foreign": 0, "scanned": 0}
    assert len(invoke(store, "list", "--json").stdout.splitlines()) == 4


def test_purge_by_key_pattern(store: KeyStore) -> None:
    reserve(store, "tmp-1")
    reserve(store, "keep-1")
    result = invoke(store, "purge", "--state", "pending", "--older-than", "0s", "--match",
                    "tmp-*", "-y")
    assert result.stdout.strip() == "deleted 1 record"
    assert state_of(store, "keep-1") is KeyState.PENDING


@pytest.mark.parametrize("args", [
    ["purge", "--state", "failed", "--older-than", "7"],  # no unit
    ["purge", "--state", "failed", "--older-than", "soon"],
    ["purge", "--older-than", "7d"],  # --state is required
    ["purge", "--state", "done", "--older-than", "7d"],  # not a state
    ["list", "--limit", "0"],
    ["show"],
])
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke(MemoryKeyStore(), *args)
    assert result.exit_code == EXIT_USAGE and result.stdout == ""


# -- stats ---------------------------------------------------------------------------------------

def test_stats_counts_states_stale_leases_and_the_oldest_record(store: KeyStore) -> None:
    reserve(store, "first")
    time.sleep(0.01)
    seed_one_of_each(store)
    claim(store, "stale", lease_ms=1)
    time.sleep(0.01)
    document = json.loads(invoke(store, "stats", "--json").stdout)
    assert document["records"] == 6 and document["scanned"] == 6
    assert document["states"] == {"pending": 2, "started": 2, "succeeded": 1, "failed": 1}
    assert document["stale_leases"] == 1
    assert document["oldest"]["key"] == "first" and document["oldest"]["age_s"] >= 0.01
    assert document["memory_bytes"] > 6 * 50 and document["memory_sampled"] == 6
    scoped = json.loads(invoke(store, "stats", "--json", "--scope", "receipts").stdout)
    assert scoped["records"] == 1 and scoped["states"]["failed"] == 1
    text = invoke(store, "stats").stdout
    assert "records:     6" in text and "started    2  (1 stale lease)" in text
    assert "oldest:      'first'" in text


def test_stats_counts_undecodable_records(store: KeyStore) -> None:
    reserve(store, "good")
    write_raw(store, RecordRef("s", "bad"), {"st": b"P"})
    result = invoke(store, "stats", "--json")
    document = json.loads(result.stdout)
    assert (document["records"], document["undecodable"], document["scanned"]) == (1, 1, 2)


def test_stats_of_an_empty_store(store: KeyStore) -> None:
    document = json.loads(invoke(store, "stats", "--json").stdout)
    assert document["records"] == 0 and document["oldest"] is None
    assert document["memory_bytes"] is None


# -- prefix, and the celery plugin group in-process ----------------------------------------------

def test_the_prefix_selects_the_apps_records(store: KeyStore) -> None:
    reserve(store, "mine")
    result = invoke(store, "--prefix", "other:", "list")
    # The store given in-process keeps its own prefix: this checks the option is validated.
    assert result.exit_code == EXIT_OK
    bad = invoke(store, "--prefix", "{x}", "list")
    assert bad.exit_code == EXIT_USAGE and "key_prefix" in bad.stderr


def test_celery_group_uses_the_store_of_the_app() -> None:
    app = make_app("memory://")
    charge, receipt = app.tasks["shop.charge"], app.tasks["shop.receipt"]
    assert charge.apply_async((7,), idempotency_key="order-7").get()["charged"] is True
    receipt.apply_async((7,), idempotency_key="order-7").get()
    result = invoke(MemoryKeyStore(), "list", "--json", group=idempotency,
                    obj=SimpleNamespace(app=app))
    assert result.exit_code == EXIT_OK, result.stderr
    rows = json_lines(result.stdout)
    assert {(row["key"], row["scope"], row["state"]) for row in rows} == {
        ("order-7", "shop.charge", "succeeded"), ("order-7", "receipts", "succeeded")}
    shown = invoke(MemoryKeyStore(), "show", "order-7", "--scope", "shop.charge", "--json",
                   group=idempotency, obj=SimpleNamespace(app=app))
    assert json.loads(shown.stdout)["result"] == {"order_id": 7, "amount": 100, "charged": True}


def test_celery_group_without_a_store_url_is_a_usage_error() -> None:
    app = Celery("bare", set_as_current=False)
    result = invoke(MemoryKeyStore(), "list", group=idempotency, obj=SimpleNamespace(app=app))
    assert result.exit_code == EXIT_USAGE
    assert "has no idempotency_store_url" in result.stderr and "--store-url" in result.stderr


def test_a_foreign_key_under_the_prefix_is_reported_not_fatal(
        redis_store: RedisKeyStore) -> None:
    store = redis_store
    reserve(store, "good")
    store.client.set("idem:{not-a-hash}", "x")
    listed = invoke(store, "list", "--json")
    assert listed.exit_code == EXIT_OK and len(listed.stdout.splitlines()) == 1
    assert "idem:{not-a-hash}" in listed.stderr and "WRONGTYPE" in listed.stderr
    document = json.loads(invoke(store, "stats", "--json").stdout)
    # Not a hash: not a record of ours at all, counted apart from records that are damaged.
    assert (document["records"], document["undecodable"], document["foreign"]) == (1, 0, 1)
