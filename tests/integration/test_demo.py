"""``make demo`` (examples/demo.py) as a user runs it: a subprocess without a TTY, CI set.

The demo checks its own claims and exits non-zero when one fails; these tests also read its
account (one execution per key, duplicates deduplicated) and make sure that every process it
started is gone afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.services import RedisServer
from tests.support.skipping import missing_service

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo.py"
DEMO_DB = 10  # a database of the session redis-server that no other test uses


def run_demo(**env: str) -> str:
    environ = {name: value for name, value in os.environ.items()
               if name not in ("REDIS_URL", "DEMO_STORE", "PYTHONPATH")}
    done = subprocess.run([sys.executable, str(DEMO)], cwd=ROOT,
                          env={**environ, "CI": "true", **env}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + "\n--- stderr ---\n" + done.stderr
    assert done.returncode == 0, f"the demo failed (exit {done.returncode}):\n{output}"
    assert "DEMO OK" in done.stdout, output
    return done.stdout


def process_groups(output: str) -> list[int]:
    """The process groups the demo reported starting (a worker, a redis-server)."""
    return sorted({int(group) for group in re.findall(r"process group (\d+)", output)})


def live_members(groups: list[int]) -> list[str]:
    """Processes still running in those groups (zombies aside: an init that does not reap
    orphans is not the demo's doing)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) in groups and state != "Z":
            alive.append(f"{entry.name} ({state}) {cmdline}")
    return alive


def assert_story(output: str) -> None:
    """The demo's account: one execution per key, duplicates given the original handle."""
    for line in (
        "[ok] the first request published the task",
        "[ok] every retry got the original task id back, with .duplicate=True",
        "[ok] all 4 .get() return the same cached result",
        "[ok] receipts really sent for order 42: 1",
        "[ok] the same key for another order (43) is refused: IdempotencyKeyMismatch",
        "[ok] the 4 spellings of the same call share one key and one task",
        "[ok] receipts really sent for order 7 by email: 1",
        "[ok] receipts really sent for order 7 by sms: 1",
        "[ok] the worker finished both messages",
        "[ok] receipts really sent for order 99: 1",
        "[ok] it is the handle of the task from step 1",
        "[ok] its state: 'SUCCESS'",
        "-> 5 messages published -> 5 finished by the worker -> 4 receipts sent",
        "[ok] each published message was finished exactly once; no duplicate was published",
    ):
        assert line in output, f"missing {line!r} in:\n{output}"
    # Step 1: one published, three duplicates with the same task id.
    step1 = re.findall(r"request \d: .*task (\S+)\s+duplicate=(\w+)", output)
    assert [dup for _, dup in step1] == ["False", "True", "True", "True"], output
    assert len({task_id for task_id, _ in step1}) == 1, output
    # Three tasks ran (42, 7 by email, 7 by sms) plus one of the two raw messages for 99;
    # the other was answered from the cache.
    assert output.count("SENT receipt #1") == 4, output
    assert "SENT receipt #2" not in output, output
    assert "replaying its result" in output, output


def test_demo_on_redis(redis_server: RedisServer) -> None:
    output = run_demo(REDIS_URL=redis_server.url(DEMO_DB))
    assert f"Redis: using REDIS_URL={redis_server.url(DEMO_DB)}" in output, output
    assert "celery -A examples.shop worker" in output, output
    assert "MEMORY" not in output, output
    assert_story(output)
    groups = process_groups(output)
    assert len(groups) == 1, output  # the worker; the Redis was ours
    assert "Stopped the worker" in output, output
    assert live_members(groups) == [], output
    # Someone else's Redis is left as found, but for the run's keys, which expire.
    match = re.search(r"\(queue (shop-demo-\w+)\)", output)
    assert match, output
    client = redis_server.client(DEMO_DB)
    left = {name.decode(): client.ttl(name) for name in client.scan_iter(count=1000)
            if match.group(1).encode() in name}
    client.close()
    assert left, "the run's idempotency keys should still be there"
    assert all(name.startswith(f"{match.group(1)}:idem:") for name in left), left
    assert all(0 < ttl <= 600 for ttl in left.values()), left


def test_demo_memory_fallback() -> None:
    output = run_demo(DEMO_STORE="memory")
    assert "Falling back to the MEMORY store" in output, output
    assert "Worker: in-process" in output, output
    assert_story(output)
    assert process_groups(output) == [], output  # started nothing


def test_demo_starts_its_own_redis_server() -> None:
    """What ``make demo`` does by default: a private redis-server and a worker, both stopped."""
    if shutil.which("redis-server") is None:
        missing_service("redis-server is not on PATH")
    output = run_demo()
    assert "Redis: started a private redis-server" in output, output
    assert_story(output)
    groups = process_groups(output)
    assert len(groups) == 2, output
    assert "Stopped the worker" in output and "Stopped redis-server" in output, output
    assert live_members(groups) == [], output
