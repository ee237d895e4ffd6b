"""``make demo``: celery-idempotency end to end, with a real worker, checking its own claims.

It runs the shop of ``examples/shop.py`` (a ``send_receipt`` task whose side effect is counted)
and shows that a task sent many times runs once per idempotency key:

1. an HTTP client retrying with one ``Idempotency-Key``: one message, one receipt, every retry
   gets the original task id (``.duplicate=True``) and the same cached result;
2. no key given: the key is derived from the bound arguments (positional, keyword, defaults);
3. a service that does not import the task sends the same message twice (``app.send_task`` with
   the ``idempotency_key`` header), as a broker redelivery would: the worker runs it once;
4. a result endpoint gets the handle back from the key alone (``result_for_key``).

Where it runs, from the environment:

``REDIS_URL``   a Redis to use (everything the demo writes is namespaced by a per-run prefix,
                its keys expire after 10 minutes, and it uses its own queue);
                otherwise a private ``redis-server`` from PATH on a free 127.0.0.1 port,
                without persistence, stopped at the end.
``DEMO_STORE``  ``auto`` (default): Redis as above, else the memory fallback;
                ``redis``: Redis or fail; ``memory``: the fallback even if Redis is there
                (in-process memory store, memory broker and a worker thread in this process).

With Redis the worker is a real ``celery -A examples.shop worker`` process (its own process
group, killed at the end whatever happens, Ctrl-C included). Exit status 0 when every claim
held, 1 with the failed claim otherwise, 130 when interrupted. No TTY needed.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from celery_idempotency import IdempotencyKeyMismatch  # noqa: E402

GET_TIMEOUT = 15.0  # seconds a .get() may wait for the worker
WORKER_READY_TIMEOUT = 30.0
KEY_TTL = 600  # the demo's keys expire after 10 minutes


class DemoFailure(Exception):
    """A claim of the demo did not hold, or it could not set itself up."""


def say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Whoever read our output is gone (`make demo | head`): carry on silently, so that the
        # cleanup still runs and the exit status still tells.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def ok(claim: str) -> None:
    say(f"   [ok] {claim}")


def expect(condition: bool, claim: str, detail: str = "") -> None:
    if not condition:
        raise DemoFailure(f"{claim}{': ' + detail if detail else ''}")
    ok(claim)


def expect_equal(label: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        raise DemoFailure(f"{label}: expected {expected!r}, got {actual!r}")
    ok(f"{label}: {actual!r}")


# -- signals ---------------------------------------------------------------------------------


class Signals:
    """Ctrl-C, SIGTERM and SIGHUP end the demo through the ``finally`` of `main`, which stops
    every process it started. They are held back while a process is being registered, and
    ignored once the cleanup has begun, so that they cannot leave a process behind."""

    def __init__(self) -> None:
        self.held = 0
        self.pending: int | None = None
        self.cleaning_up = False

    def install(self) -> None:
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            # A signal ignored by whoever started us (nohup, a background job) stays ignored.
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.cleaning_up:
            return
        if self.held:
            self.pending = signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            if not self.held and self.pending is not None and not self.cleaning_up:
                signum, self.pending = self.pending, None
                self._raise(signum)


signals = Signals()


# -- processes -------------------------------------------------------------------------------


@dataclass
class Started:
    label: str
    process: subprocess.Popen[bytes]


@dataclass
class Processes:
    """Every process the demo starts, each leading its own process group, all stopped at the end
    (the group, so that a prefork worker's children go with it); and their logs' directory."""

    started: list[Started] = field(default_factory=list)
    _workdir: Path | None = None

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="shop-demo-"))
        return self._workdir

    def remove_workdir(self, *, keep_logs: bool) -> None:
        if self._workdir is None:
            return
        if keep_logs and any(self._workdir.iterdir()):
            say(f"Logs kept in {self._workdir}")
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def spawn(self, label: str, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        with signals.hold():  # no Ctrl-C between starting it and knowing about it
            process = subprocess.Popen(argv, start_new_session=True, **popen)
            self.started.append(Started(label, process))
        return process

    def stop_all(self) -> None:
        while self.started:
            entry = self.started.pop()
            process, pgid = entry.process, entry.process.pid
            if process.poll() is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _killpg(pgid, signal.SIGKILL)
                    process.wait(timeout=10)
            # Whatever is left in the group (e.g. orphaned pool children) goes too.
            _killpg(pgid, signal.SIGKILL)
            say(f"Stopped {entry.label} (process group {pgid}).")


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(url: str) -> str | None:
    """None if the Redis at ``url`` answers, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
        return None
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def start_redis_server(procs: Processes) -> str | None:
    """Start a private redis-server; its base URL (without db), or None if there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    workdir = procs.workdir
    for _ in range(3):  # a free port can be taken before redis-server binds it: try another
        port = free_port()
        log = (workdir / "redis.log").open("ab")
        process = procs.spawn(
            "redis-server", [binary, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir),
                             "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        url = f"redis://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None:
            if ping(url) is None:
                version = redis.Redis.from_url(url).info("server").get("redis_version", "?")
                say(f"Redis: started a private redis-server {version} on 127.0.0.1:{port} "
                    f"(process group {process.pid}; no persistence; stopped at the end).")
                return url
            time.sleep(0.02)
        procs.stop_all()
    log_text = (workdir / "redis.log").read_text(errors="replace")[-2000:]
    raise DemoFailure(f"redis-server ({binary}) did not start:\n{log_text}")


# -- where to run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    kind: str  # "redis" or "memory"
    env: dict[str, str]  # for examples/shop.py
    lines: list[str]  # what to tell the user
    shared_redis: str | None = None  # REDIS_URL: someone else's Redis, to leave as found


def tidy_shared_redis(url: str, namespace: str) -> None:
    """Remove what the run left without an expiry in someone else's Redis: the receipt counters
    and kombu's tables for the run's queue. (Its idempotency keys expire after KEY_TTL.)"""
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        names = [*client.scan_iter(match=f"{namespace}:receipts:*", count=1000),
                 *client.scan_iter(match=f"_kombu.binding*.{namespace}", count=1000)]
        if names:
            client.delete(*names)
    except redis.RedisError as exc:
        say(f"Could not remove this run's keys ({namespace}:receipts:*) from {url}: {exc}")
    finally:
        client.close()


def choose_setup(procs: Processes, namespace: str) -> Setup:
    mode = os.environ.get("DEMO_STORE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "redis", "memory"):
        raise DemoFailure(f"DEMO_STORE must be auto, redis or memory, not {mode!r}")
    base = {"SHOP_NAMESPACE": namespace, "IDEMPOTENCY_TTL": str(KEY_TTL)}
    why_not_redis = "DEMO_STORE=memory"
    if mode != "memory":
        given = os.environ.get("REDIS_URL")
        if given:
            problem = ping(given)
            if problem is None:
                say(f"Redis: using REDIS_URL={given} (this run's keys are prefixed "
                    f"{namespace}: and expire after {KEY_TTL} s).")
                return Setup("redis", {**base, "BROKER_URL": given,
                                       "IDEMPOTENCY_STORE_URL": given, "RECEIPTS_URL": given},
                             [f"broker     {given}  (queue {namespace})",
                              f"key store  {given}  (idempotency_store_url)",
                              f"receipts   {given}  (the side effect: an INCR per receipt)"],
                             shared_redis=given)
            say(f"Redis: REDIS_URL={given} is not reachable ({problem}); trying a private "
                "redis-server instead.")
        url = start_redis_server(procs)
        if url is not None:
            return Setup("redis", {**base, "BROKER_URL": f"{url}/0",
                                   "IDEMPOTENCY_STORE_URL": f"{url}/1",
                                   "RECEIPTS_URL": f"{url}/2"},
                         [f"broker     {url}/0  (queue {namespace})",
                          f"key store  {url}/1  (idempotency_store_url)",
                          f"receipts   {url}/2  (the side effect: an INCR per receipt)"])
        why_not_redis = "no reachable REDIS_URL and no redis-server on PATH"
        if mode == "redis":
            raise DemoFailure(f"DEMO_STORE=redis, but there is no Redis: {why_not_redis}")
    say(f"NOTE: no Redis ({why_not_redis}).")
    say("      Falling back to the MEMORY store, the memory broker and a worker thread inside")
    say("      this process. Same semantics, but a memory store only protects one process:")
    say("      real workers need Redis (set REDIS_URL, or put redis-server on PATH).")
    return Setup("memory", {**base, "BROKER_URL": "memory://",
                            "IDEMPOTENCY_STORE_URL": "memory://", "RECEIPTS_URL": ""},
                 ["broker     memory://  (in this process)",
                  "key store  memory://  (idempotency_store_url; in this process)",
                  "receipts   counted in this process (the side effect)"])


# -- the worker --------------------------------------------------------------------------------


@dataclass
class WorkerLog:
    """What the worker did, for the account at the end: the lines worth reading."""

    path: Path | None = None
    records: list[str] = field(default_factory=list)

    INTERESTING = re.compile(r"SENT receipt|replaying|looking again|taken over|ERROR")
    # "[2024-01-01 12:00:00,000: INFO/ForkPoolWorker-1] message" -> "ForkPoolWorker-1: message"
    PREFIX = re.compile(r"^\[[^\]]*: \w+/([^\]]+)\] ")

    def lines(self) -> list[str]:
        raw = self.path.read_text(errors="replace").splitlines() if self.path else self.records
        return [self.PREFIX.sub(r"\1: ", line) for line in raw if self.INTERESTING.search(line)]

    def tail(self, chars: int = 3000) -> str:
        if self.path and self.path.exists():
            return self.path.read_text(errors="replace")[-chars:]
        return "\n".join(self.records)[-chars:]


@contextlib.contextmanager
def process_worker(procs: Processes, namespace: str,
                   env: dict[str, str]) -> Iterator[WorkerLog]:
    log = WorkerLog(procs.workdir / "worker.log")
    assert log.path is not None
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "celery", "-A", "examples.shop", "worker", "-P", "prefork",
            "-c", "2", "-n", f"{namespace}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    began = time.monotonic()
    with log.path.open("ab") as out:
        process = procs.spawn("the worker", argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **env, "PYTHONPATH": pythonpath})
    while " ready." not in log.tail(100_000):
        if process.poll() is not None:
            raise DemoFailure(f"the worker exited with status {process.returncode} before it "
                              f"was ready:\n{log.tail()}")
        if time.monotonic() - began > WORKER_READY_TIMEOUT:
            raise DemoFailure(f"the worker was not ready after {WORKER_READY_TIMEOUT:.0f} s:\n"
                              f"{log.tail()}")
        time.sleep(0.1)
    say(f"Worker: celery -A examples.shop worker -P prefork -c 2 (process group {process.pid}),"
        f" ready in {time.monotonic() - began:.1f} s.")
    yield log


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName != "MainThread":  # the worker's lines, not the publisher's
            self.records.append(f"{record.threadName}: {record.getMessage()}")


@contextlib.contextmanager
def thread_worker(shop: ModuleType) -> Iterator[WorkerLog]:
    from celery.contrib.testing.worker import start_worker

    log = WorkerLog()
    handler = _ListHandler(log.records)
    loggers = [logging.getLogger(name) for name in ("celery_idempotency", shop.__name__)]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False
    try:
        began = time.monotonic()
        with start_worker(shop.app, pool="threads", concurrency=2, perform_ping_check=False,
                          shutdown_timeout=15):
            say(f"Worker: in-process (threads pool, 2 threads), ready in "
                f"{time.monotonic() - began:.1f} s.")
            yield log
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


# -- the story -------------------------------------------------------------------------------


def show_handles(calls: list[tuple[str, Any]]) -> None:
    width = max(len(label) for label, _ in calls)
    for label, handle in calls:
        note = "duplicate: nothing published" if handle.duplicate else "published"
        say(f"   {label:<{width}}  task {handle.id}  duplicate={handle.duplicate!s:<5}  "
            f"({note})")


def wait_for(what: str, condition: Callable[[], bool], timeout: float = GET_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise DemoFailure(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def story(shop: ModuleType) -> None:
    send_receipt, receipts = shop.send_receipt, shop.receipts
    published: list[str] = []  # task ids of the messages that really went to the broker
    sends = 0

    # 1 -------------------------------------------------------------------------------------
    key = str(uuid.uuid4())
    say()
    say("1. POST /orders/42/receipt with Idempotency-Key: " + key)
    say("   The client times out and retries the same request three times.")
    handles = []
    for _ in range(4):
        handles.append(send_receipt.apply_async((42,), idempotency_key=key))
        sends += 1
    show_handles([(f"request {n}: send_receipt.apply_async((42,), idempotency_key=key)", h)
                  for n, h in enumerate(handles, 1)])
    first = handles[0]
    published.append(first.id)
    expect(not first.duplicate, "the first request published the task")
    expect(all(h.duplicate and h.id == first.id for h in handles[1:]),
           "every retry got the original task id back, with .duplicate=True",
           f"{[(h.id, h.duplicate) for h in handles]}")
    results = [h.get(timeout=GET_TIMEOUT) for h in handles]
    say(f"   .get() on the 4 handles -> {results[0]}")
    expect(all(r == results[0] for r in results), "all 4 .get() return the same cached result",
           f"{results}")
    expect_equal("receipts really sent for order 42", receipts.sent(42), 1)
    try:
        send_receipt.apply_async((43,), idempotency_key=key)
    except IdempotencyKeyMismatch as exc:
        sends += 1
        ok(f"the same key for another order (43) is refused: IdempotencyKeyMismatch ({exc})")
    else:
        raise DemoFailure("reusing the key for order 43 was accepted; expected "
                          "IdempotencyKeyMismatch")

    # 2 -------------------------------------------------------------------------------------
    say()
    say("2. No key given: it is derived from the task's bound arguments (defaults applied).")
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("send_receipt.delay(7)", lambda: send_receipt.delay(7)),
        ("send_receipt.delay(order_id=7)", lambda: send_receipt.delay(order_id=7)),
        ('send_receipt.delay(7, "email")', lambda: send_receipt.delay(7, "email")),
        ('send_receipt.apply_async(kwargs={"order_id": 7, "channel": "email"})',
         lambda: send_receipt.apply_async(kwargs={"order_id": 7, "channel": "email"})),
    ]
    same = [call() for _, call in calls]
    sms = send_receipt.delay(7, channel="sms")
    sends += len(same) + 1
    show_handles([*((label, h) for (label, _), h in zip(calls, same, strict=True)),
                  ('send_receipt.delay(7, channel="sms")', sms)])
    published += [same[0].id, sms.id]
    say(f"   derived keys: {same[0].idempotency_key} (email), {sms.idempotency_key} (sms)")
    expect(not same[0].duplicate and all(h.duplicate and h.id == same[0].id for h in same[1:]),
           "the 4 spellings of the same call share one key and one task",
           f"{[(h.id, h.duplicate, h.idempotency_key) for h in same]}")
    expect(not sms.duplicate and sms.id != same[0].id,
           "other arguments (channel='sms') make another key and another task")
    email_results = [h.get(timeout=GET_TIMEOUT) for h in same]
    sms_result = sms.get(timeout=GET_TIMEOUT)
    say(f"   .get() -> {email_results[0]} (x4) and {sms_result}")
    expect(all(r == email_results[0] for r in email_results),
           "the 4 handles return the same cached result")
    expect_equal("receipts really sent for order 7 by email", receipts.sent(7, "email"), 1)
    expect_equal("receipts really sent for order 7 by sms", receipts.sent(7, "sms"), 1)

    # 3 -------------------------------------------------------------------------------------
    key3 = str(uuid.uuid4())
    say()
    say("3. Another service, which does not import the task, sends the same message twice:")
    say(f"   app.send_task('shop.send_receipt', (99,), headers={{'idempotency_key': '{key3}'}})")
    say("   Nothing is checked at publish then, so both messages reach the worker, as with a")
    say("   broker redelivering a message.")
    messages = [shop.app.send_task(shop.TASK_NAME, (99,), headers={"idempotency_key": key3})
                for _ in range(2)]
    sends += 2
    published += [m.id for m in messages]
    for number, message in enumerate(messages, 1):
        say(f"   message {number}: task {message.id}")

    def finished(task_id: str) -> bool:
        return (task_id, "SUCCESS") in receipts.deliveries()

    wait_for("the worker to finish both messages", lambda: all(finished(m.id) for m in messages))
    ok("the worker finished both messages")
    owner = send_receipt.result_for_key(key3)
    expect(owner is not None and owner.id in [m.id for m in messages],
           "the key belongs to one of them", f"{owner!r}")
    assert owner is not None
    other = next(m.id for m in messages if m.id != owner.id)
    say(f"   task {owner.id} ran; task {other} was answered from the cache")
    expect_equal("receipts really sent for order 99", receipts.sent(99), 1)

    # 4 -------------------------------------------------------------------------------------
    say()
    say(f"4. GET /orders/42/receipt with only the Idempotency-Key: {key}")
    handle = send_receipt.result_for_key(key)
    say(f"   send_receipt.result_for_key(key) -> {handle!r}")
    expect(handle is not None and handle.id == first.id,
           "it is the handle of the task from step 1", f"{handle!r} vs {first.id}")
    assert handle is not None
    expect_equal("its state", handle.state, "SUCCESS")
    expect_equal("its .get()", handle.get(timeout=GET_TIMEOUT), results[0])
    expect_equal("an unknown key", send_receipt.result_for_key(str(uuid.uuid4())), None)

    # summary --------------------------------------------------------------------------------
    say()

    def settled() -> bool:
        return set(published) <= {t for t, state in receipts.deliveries() if state == "SUCCESS"}

    wait_for("the worker to report every published message", settled)
    deliveries = receipts.deliveries()
    done = [t for t, state in deliveries if state == "SUCCESS"]
    total = sum(receipts.sent(o, c) for o, c in ((42, "email"), (7, "email"), (7, "sms"),
                                                  (99, "email"), (43, "email")))
    say(f"In all: {sends} sends (1 refused) -> {len(published)} messages published -> "
        f"{len(done)} finished by the worker -> {total} receipts sent (order 42, order 7 by "
        "email, order 7 by sms, order 99).")
    expect_equal("receipts sent in all", total, 4)
    expect(sorted(done) == sorted(published),
           "each published message was finished exactly once; no duplicate was published",
           f"published {published}, finished {deliveries}")


def account(log: WorkerLog) -> None:
    lines = log.lines()
    if lines:
        say()
        say("What the worker did (its log, filtered):")
        for line in lines:
            say(f"   {line}")


def run(procs: Processes) -> None:
    namespace = f"shop-demo-{uuid.uuid4().hex[:8]}"
    setup = choose_setup(procs, namespace)
    for line in setup.lines:
        say(f"   {line}")
    # examples/shop.py reads its settings when imported: set them first.
    for name, value in setup.env.items():
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    shop = importlib.import_module("examples.shop")
    worker = (process_worker(procs, namespace, setup.env) if setup.kind == "redis"
              else thread_worker(shop))
    try:
        with worker as log:
            try:
                story(shop)
            except Exception:
                say()
                say("Worker log (tail):")
                say(log.tail())
                raise
            account(log)
    finally:
        if setup.shared_redis:
            tidy_shared_redis(setup.shared_redis, namespace)


def main() -> int:
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    signals.install()
    say("celery-idempotency demo: send_receipt must send one receipt per order, however often")
    say("it is sent or delivered.")
    began = time.monotonic()
    procs = Processes()
    status, keep_logs = 1, True
    try:
        run(procs)
        status, keep_logs = 0, False
    except DemoFailure as exc:
        print(f"\nDEMO FAILED: {exc}", file=sys.stderr, flush=True)
    except Exception as exc:
        traceback.print_exc()
        print(f"\nDEMO FAILED: unexpected {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr, flush=True)
        status, keep_logs = 130, False
    except SystemExit:
        print("\nTerminated.", file=sys.stderr, flush=True)
        keep_logs = False
        raise
    finally:
        signals.cleaning_up = True
        say()
        procs.stop_all()
        procs.remove_workdir(keep_logs=keep_logs)
    if status == 0:
        say(f"DEMO OK: every claim above was checked ({time.monotonic() - began:.1f} s).")
    return status


if __name__ == "__main__":
    sys.exit(main())
