"""Hostile records: whatever a publisher (or anything writing under the prefix) puts in a
key, task id, scope, owner, task name or error message, the CLI prints it escaped; only JSON
carries the raw value, JSON-escaped. Keys that are not records of ours are counted, not
skipped silently. And `stats` tells what the server does when its memory is full."""

from __future__ import annotations

import json
from typing import Any

import pytest

from celery_idempotency import KeyStore, RecordRef, RedisKeyStore
from celery_idempotency.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from celery_idempotency.cli.terminal import json_safe, safe_text, shown
from celery_idempotency.records import KeyState, state_code
from tests.cli.conftest import claim, invoke, reserve, run_standalone
from tests.support.records import write_raw
from tests.support.services import RedisServer

OSC = "\x1b]0;pwned\x07"  # retitles the terminal
CLEAR = "\x1b[2J"  # clears it
RLO = "\u202e"  # shows what follows right to left
C1_CSI = "\x9b2J"  # the 8-bit form of ESC [
KEY = f"order{OSC}-1"
TASK_ID = f"task{CLEAR}-1"
SCOPE = f"shop{RLO}egrahc"
OWNER = f"w{C1_CSI}1"
TASK_NAME = f"shop.charge{OSC}"
ERROR = {"type": f"shop.Declined{RLO}", "message": f"declined {OSC}{CLEAR} \\ done", "args": []}
RAW = ("\x1b", "\x07", "\x9b", RLO)  # none of these may reach a terminal


def hostile(store: KeyStore, key: str = KEY, *, state: str = "failed") -> None:
    """A record written raw, as a publisher choosing its task id and error message makes it."""
    fields = {"k": key, "s": SCOPE, "n": TASK_NAME, "st": state_code(KeyState(state)),
              "t": TASK_ID, "fp": "fp",
              "o": OWNER, "f": "3", "c": "1700000000000", "u": "1700000000000"}
    if state == "failed":
        fields.update({"e": json.dumps(ERROR), "ry": "0"})
    if state == "started":
        fields["l"] = "99999999999999"  # a live lease: release refuses it
    write_raw(store, RecordRef(SCOPE, key), {name: value.encode() for name, value in
                                             fields.items()})


def assert_inert(text: str) -> None:
    assert not [char for char in RAW if char in text], repr(text)


def test_list_and_show_escape_every_store_string(store: KeyStore) -> None:
    hostile(store)
    listed = invoke(store, "list")
    assert listed.exit_code == EXIT_OK, listed.stderr
    assert_inert(listed.stdout + listed.stderr)
    assert "order\\x1b]0;pwned\\x07-1" in listed.stdout and "task\\x1b[2J-1" in listed.stdout
    assert "shop\\u202eegrahc" in listed.stdout

    detail = invoke(store, "show", KEY)
    assert detail.exit_code == EXIT_OK, detail.stderr
    assert_inert(detail.stdout + detail.stderr)
    for escaped in ("w\\x9b2J1", "shop.charge\\x1b]0;pwned\\x07", "shop.Declined\\u202e",
                    "declined \\x1b]0;pwned\\x07\\x1b[2J \\\\ done"):
        assert escaped in detail.stdout


def test_stats_and_refusals_escape_store_strings(store: KeyStore) -> None:
    hostile(store, state="started")
    stats = invoke(store, "stats")
    assert_inert(stats.stdout + stats.stderr)
    assert "oldest:      'order\\x1b]0;pwned\\x07-1'" in stats.stdout
    refused = invoke(store, "release", KEY)
    assert refused.exit_code == EXIT_REFUSED
    assert_inert(refused.stdout + refused.stderr)
    assert "task\\x1b[2J-1" in refused.stderr and "w\\x9b2J1" in refused.stderr
    # A key in two scopes: the error lists the scopes, escaped.
    reserve(store, KEY, scope="plain")
    ambiguous = invoke(store, "show", KEY)
    assert ambiguous.exit_code == EXIT_USAGE
    assert_inert(ambiguous.stderr)
    assert "shop\\u202eegrahc" in ambiguous.stderr


def test_json_carries_the_raw_values_json_escaped(store: KeyStore) -> None:
    hostile(store)
    listed = invoke(store, "list", "--json")
    detail = invoke(store, "show", KEY, "--json")
    for output in (listed.stdout, detail.stdout):
        assert_inert(output)
        assert "\\u001b]0;pwned\\u0007" in output and "\\u202e" in output
    row = json.loads(listed.stdout)
    assert (row["key"], row["task_id"], row["scope"], row["task_name"]) == (
        KEY, TASK_ID, SCOPE, TASK_NAME)
    document = json.loads(detail.stdout)
    assert document["owner"] == OWNER and document["error"]["message"] == ERROR["message"]


def test_a_real_piped_cli_escapes_too(redis_store: RedisKeyStore, redis_server: RedisServer
                                      ) -> None:
    """What an operator runs with output piped (click strips CSI colours, not OSC or C1)."""
    hostile(redis_store)
    url = redis_server.url(9)
    for args in (("list",), ("show", KEY), ("stats",), ("list", "--json")):
        result = run_standalone("--store-url", url, *args)
        assert result.code == EXIT_OK, result.err
        assert_inert(result.out + result.err)
        assert "pwned" in result.out


@pytest.mark.parametrize(("text", "escaped"), [
    ("plain key", "plain key"),
    ("a\\b", "a\\\\b"),  # a backslash is doubled: what is shown maps back to one value
    ("a\nb\tc", "a\\x0ab\\x09c"),
    ("\x1b]8;;http://x\x1b\\link", "\\x1b]8;;http://x\\x1b\\\\link"),
    ("\u2066isolate\u2069 \u200bzw \x7f \x85", "\\u2066isolate\\u2069 \\u200bzw \\x7f \\x85"),
    ("\udcff", "\\udcff"),  # a lone surrogate (from undecodable bytes)
    ("\U000e0041", "\\U000e0041"),  # a tag character: invisible
    ("café ✓ 漢字", "café ✓ 漢字"),  # printable non-ASCII is kept
])
def test_shown(text: str, escaped: str) -> None:
    assert shown(text) == escaped


def test_safe_text_keeps_line_breaks_and_backslashes_of_a_whole_message() -> None:
    assert safe_text("line 1\nkey a\\x1b \x1b[2J\u202e") == "line 1\nkey a\\x1b \\x1b[2J\\u202e"


@pytest.mark.parametrize("value", [OSC + CLEAR + RLO + C1_CSI, "\U000e0041x", "\udcff", "ok"])
def test_json_safe_is_exact_and_inert(value: Any) -> None:
    text = json_safe(json.dumps({"v": value}, ensure_ascii=False))
    assert json.loads(text) == {"v": value}
    assert text.isprintable()


# -- counting what is not ours ----------------------------------------------------------------

def test_foreign_hashes_and_undecodable_records_are_counted(store: KeyStore) -> None:
    reserve(store, "good")
    write_raw(store, RecordRef("x", "foreign"), {"foo": b"bar"})  # a hash of someone else's
    write_raw(store, RecordRef("x", "broken"), {"k": b"b", "st": b"exploded"})  # ours, damaged
    listed = invoke(store, "list", "--json")
    assert [json.loads(line)["key"] for line in listed.stdout.splitlines()] == ["good"]
    assert "skipped 1 undecodable record" in listed.stderr
    assert "skipped 1 key under the prefix that are not records" in listed.stderr
    document = json.loads(invoke(store, "stats", "--json").stdout)
    assert (document["records"], document["undecodable"], document["foreign"],
            document["scanned"]) == (1, 1, 1, 3)
    text = invoke(store, "stats").stdout
    assert "undecodable: 1" in text and "foreign:     1" in text
    purged = json.loads(invoke(store, "purge", "--state", "pending", "--older-than", "1d",
                               "--dry-run", "--json").stdout)
    assert (purged["undecodable"], purged["foreign"], purged["scanned"]) == (1, 1, 3)


def test_keys_of_other_types_and_names_that_are_not_utf8_are_counted(
        redis_store: RedisKeyStore) -> None:
    reserve(redis_store, "good")
    client = redis_store.client
    client.rpush("idem:{a-list}", "x")
    client.hset(b"idem:{\xff\xfe}", "st", "P")  # a key name that is not UTF-8
    document = json.loads(invoke(redis_store, "stats", "--json").stdout)
    assert (document["records"], document["foreign"], document["undecodable"]) == (1, 1, 1)
    listed = invoke(redis_store, "list")
    assert listed.exit_code == EXIT_OK
    assert "not UTF-8" in listed.stderr and "idem:{\\xff\\xfe}" in listed.stderr


# -- eviction ------------------------------------------------------------------------------------

def test_stats_shows_the_memory_policy_and_evicted_keys(redis_store: RedisKeyStore) -> None:
    client = redis_store.client
    document = json.loads(invoke(redis_store, "stats", "--json").stdout)
    [server] = document["eviction"]
    assert (server["maxmemory_policy"], server["maxmemory"], server["may_evict_records"]) == (
        "noeviction", 0, False)
    assert server["evicted_keys"] == client.info("stats")["evicted_keys"]
    client.config_set("maxmemory-policy", "volatile-lru")
    client.config_set("maxmemory", "512mb")
    try:
        text = invoke(redis_store, "stats").stdout
        assert "maxmemory-policy volatile-lru, maxmemory 512.0 MiB" in text
        assert "MAY EVICT RECORDS" in text and "evicted_keys " in text
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "0")


def test_stats_of_the_memory_store_has_no_eviction(store: KeyStore) -> None:
    claim(store, "k")
    document = json.loads(invoke(store, "stats", "--json").stdout)
    if isinstance(store, RedisKeyStore):
        assert document["eviction"][0]["maxmemory_policy"] == "noeviction"
    else:
        assert document["eviction"] is None and document["eviction_unknown"] is None
