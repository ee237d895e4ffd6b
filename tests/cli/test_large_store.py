"""A store of 100,000 keys: `list --limit` answers at once, `list` streams every key, `stats`
counts them all exactly and reports progress, well within the time budget."""

from __future__ import annotations

import json
import time

from celery_idempotency.cli import EXIT_OK
from tests.cli.conftest import DB, run_standalone
from tests.cli.seeding import seed
from tests.support.services import RedisServer

COUNT = 100_000


def test_hundred_thousand_keys(redis_server: RedisServer, redis_url: str) -> None:
    client = redis_server.client(db=DB)
    expected = seed(client, COUNT, now_ms=int(time.time() * 1000))
    assert client.dbsize() == COUNT

    first = run_standalone("--store-url", redis_url, "list", "--limit", "10", "--json")
    assert first.code == EXIT_OK, first.err
    rows = [json.loads(line) for line in first.out.splitlines()]
    assert len(rows) == 10 and all(row["key"].startswith("key-") for row in rows)

    table = run_standalone("--store-url", redis_url, "list", "--stale", "--limit", "10")
    lines = table.out.splitlines()
    assert len(lines) == 11 and all("STALE" in line for line in lines[1:])

    receipts = run_standalone("--store-url", redis_url, "list", "--scope", "receipts", "--json")
    assert len(receipts.out.splitlines()) == expected["scope:receipts"] == COUNT // 2

    stats_started = time.monotonic()
    stats = run_standalone("--store-url", redis_url, "stats", "--json", "--progress")
    stats_seconds = time.monotonic() - stats_started
    assert stats.code == EXIT_OK, stats.err
    document = json.loads(stats.out)
    assert document["records"] == document["scanned"] == COUNT
    assert document["states"] == {state: expected[state] for state in
                                  ("pending", "started", "succeeded", "failed")}
    assert document["stale_leases"] == expected["stale"] == COUNT // 8
    assert document["oldest"]["key"] == f"key-{COUNT - 1:07d}"
    sampled_average = document["memory_bytes"] / COUNT
    assert 100 < sampled_average < 2_000 and document["memory_sampled"] == 200
    assert "stats: 100,000 records scanned" in stats.err  # one line per 100,000 when not a TTY

    print(f"\nstats on {COUNT:,} keys: {stats_seconds:.2f}s (scan {document['elapsed_s']}s)")
