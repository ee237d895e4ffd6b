"""Redis error replies, produced for real on private redis-servers, as every store method sees
them: "not now" replies are `StoreUnavailable` (exactly like an unreachable store), "never"
replies `StoreMisconfigured`, a record that is not ours `CorruptRecord` naming its Redis key.

Each fault is injected the way production meets it: the endpoint is a replica (REPLICAOF),
memory is full (maxmemory + noeviction), too few replicas (min-replicas-to-write), a failed
background save (MISCONF), a long script (BUSY), a replica cut off from its master with
replica-serve-stale-data no (MASTERDOWN), a server loading its data (LOADING), ACLs (NOPERM).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from celery_idempotency import (
    CorruptRecord,
    RedisKeyStore,
    StoreMisconfigured,
    StoreUnavailable,
)
from celery_idempotency.exceptions import IdempotencyError
from celery_idempotency.leases import owner_prefix
from celery_idempotency.store.errors import REQUIRED_COMMANDS
from tests.support.records import DAY_MS, REF, RESULT
from tests.support.services import RedisServer, free_port
from tests.support.skipping import missing_service

PREFIX = "t:"
OWNER = owner_prefix(4242) + "abcd"


# -- the store methods, each from a state in which it writes --------------------------------

def _reserved(store: RedisKeyStore) -> None:
    store.reserve(REF, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=DAY_MS)


def _claimed(store: RedisKeyStore) -> None:
    _reserved(store)
    store.claim(REF, task_id="t1", owner=OWNER, fingerprint="fp1", task_name="tasks.charge",
                lease_ms=60_000, ttl_ms=DAY_MS)


_FENCE: dict[str, int] = {}  # the fence of the last `_claimed_with_fence`


def _claimed_with_fence(store: RedisKeyStore) -> None:
    _reserved(store)
    _FENCE["fence"] = store.claim(REF, task_id="t1", owner=OWNER, fingerprint="fp1",
                                  task_name="tasks.charge", lease_ms=60_000,
                                  ttl_ms=DAY_MS).fence


def _fence(store: RedisKeyStore) -> int:
    return _FENCE.get("fence", 0)


@dataclass(frozen=True)
class Op:
    name: str
    setup: Callable[[RedisKeyStore], None]
    call: Callable[[RedisKeyStore], Any]
    writes: bool = True


OPS = [
    Op("reserve", lambda s: None, lambda s: s.reserve(
        REF, task_id="t1", fingerprint="fp1", task_name="tasks.charge", ttl_ms=DAY_MS)),
    Op("unreserve", _reserved, lambda s: s.unreserve(REF, task_id="t1")),
    Op("claim", _reserved, lambda s: s.claim(
        REF, task_id="t1", owner=OWNER, fingerprint="fp1", task_name="tasks.charge",
        lease_ms=60_000, ttl_ms=DAY_MS)),
    # A message sent by name with a key header: no reservation, the claim creates the record.
    Op("claim_new", lambda s: None, lambda s: s.claim(
        REF, task_id="t1", owner=OWNER, fingerprint="fp1", task_name="tasks.charge",
        lease_ms=60_000, ttl_ms=DAY_MS)),
    Op("complete", _claimed_with_fence, lambda s: s.complete(
        REF, owner=OWNER, fence=_fence(s), result=RESULT, ttl_ms=DAY_MS)),
    Op("fail", _claimed, lambda s: s.fail(REF, owner=OWNER, error='{"type":"E"}',
                                          retryable=True, ttl_ms=DAY_MS)),
    Op("requeue", _claimed, lambda s: s.requeue(REF, owner=OWNER, pending_ms=60_000)),
    Op("renew", _claimed, lambda s: s.renew(REF, owner=OWNER, lease_ms=60_000)),
    Op("discard", _claimed, lambda s: s.discard(REF, owner=OWNER)),
    Op("abandon", _claimed, lambda s: s.abandon(
        REF, task_id="t1", owner_prefix=owner_prefix(4242), requeued=False,
        error='{"type":"WorkerLostError"}', ttl_ms=DAY_MS, pending_ms=60_000)),
    # Recovery points: the claim's fence is read back, as the task holds it.
    Op("begin_step", _claimed_with_fence, lambda s: s.begin_step(
        REF, owner=OWNER, fence=_fence(s), name="charge", lease_ms=60_000)),
    Op("save_step", _claimed_with_fence, lambda s: s.save_step(
        REF, owner=OWNER, fence=_fence(s), name="charge", value=b"\0\0{}")),
    Op("get", _reserved, lambda s: s.get(REF), writes=False),
    Op("entry", _reserved, lambda s: s.entry(REF), writes=False),
]
OP_IDS = [op.name for op in OPS]


# -- servers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[RedisServer, RedisServer]]:
    """The store's server and another one to make it a replica of."""
    primary = RedisServer().start()
    # Full syncs at once (the default waits 5 s for more replicas to join a diskless sync).
    other = RedisServer(extra_args=("--repl-diskless-sync-delay", "0")).start()
    yield primary, other
    primary.close()
    other.close()


@pytest.fixture
def server(servers: tuple[RedisServer, RedisServer]) -> Iterator[RedisServer]:
    primary, other = servers
    admin = primary.client()
    admin.flushall()
    yield primary
    # Whatever a test left behind: a master again, no limits, no users, writable.
    admin.replicaof("no", "one")
    admin.config_set("replica-serve-stale-data", "yes")
    admin.config_set("maxmemory", 0)
    admin.config_set("min-replicas-to-write", 0)
    admin.config_set("save", "")
    primary.dir.mkdir(exist_ok=True)
    for user in admin.acl_users():
        if user != "default":
            admin.acl_deluser(user)
    admin.flushall()
    other.client().flushall()


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisKeyStore]:
    store = RedisKeyStore.from_url(server.url(), prefix=PREFIX)
    yield store
    store.close()


def _wait(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- faults: inject, then clear -------------------------------------------------------------

class Fault:
    code = ""
    refuses_reads = False
    must_refuse: tuple[str, ...] | None = None  # None: every write

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        raise NotImplementedError

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        raise NotImplementedError


class ReadOnly(Fault):
    """The endpoint is now a replica (what a client that missed a failover talks to)."""
    code = "READONLY"

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        source, target = primary.client(), other.client()
        for name in source.keys("*"):  # the new master holds the same records
            target.restore(name, 0, source.dump(name), replace=True)
        source.replicaof("127.0.0.1", other.port)
        _wait(lambda: source.info("replication").get("master_link_status") == "up",
              "the replica to sync")

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        primary.client().replicaof("no", "one")


class OutOfMemory(Fault):
    """maxmemory reached with noeviction. Redis refuses a command that may grow memory (HSET),
    and lets a script that already wrote (an HDEL first) finish: atomic either way. Creating
    a record (reserve, a claim without reservation) is always refused."""
    code = "OOM"
    must_refuse = ("reserve", "claim_new")

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        admin = primary.client()
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        primary.client().config_set("maxmemory", 0)


class NoReplicas(Fault):
    code = "NOREPLICAS"

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        primary.client().config_set("min-replicas-to-write", 1)

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        primary.client().config_set("min-replicas-to-write", 0)


class Misconf(Fault):
    """A background save failed (its directory is gone) with save points configured."""
    code = "MISCONF"

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        admin = primary.client()
        admin.config_set("save", "3600 1")
        shutil.rmtree(primary.dir)
        admin.bgsave()
        _wait(lambda: admin.info("persistence")["rdb_last_bgsave_status"] == "err"
              and not admin.info("persistence")["rdb_bgsave_in_progress"], "the save to fail")

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        primary.dir.mkdir(exist_ok=True)
        primary.client().config_set("save", "")


class Busy(Fault):
    """Another client's script runs longer than busy-reply-threshold."""
    code = "BUSY"
    refuses_reads = True
    SCRIPT = ("local t0 = tonumber(redis.call('TIME')[1]) "
              "while tonumber(redis.call('TIME')[1]) - t0 < 20 do end return 1")

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        admin = primary.client()
        admin.config_set("busy-reply-threshold", 50)

        def long_script() -> None:
            with contextlib.suppress(redis.RedisError):  # killed by clear()
                primary.client().eval(self.SCRIPT, 0)

        self.thread = threading.Thread(target=long_script, daemon=True)
        self.thread.start()

        def busy() -> bool:
            try:
                admin.ping()
            except redis.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False
        _wait(busy, "the server to be busy")

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        primary.client().script_kill()
        self.thread.join(10)


class MasterDown(Fault):
    """A replica whose master is unreachable, with replica-serve-stale-data no."""
    code = "MASTERDOWN"
    refuses_reads = True

    def inject(self, primary: RedisServer, other: RedisServer) -> None:
        admin = primary.client()
        admin.config_set("replica-serve-stale-data", "no")
        admin.replicaof("127.0.0.1", free_port())  # nothing listens there

    def clear(self, primary: RedisServer, other: RedisServer) -> None:
        admin = primary.client()
        admin.replicaof("no", "one")
        admin.config_set("replica-serve-stale-data", "yes")


FAULTS = [ReadOnly, OutOfMemory, NoReplicas, Misconf, Busy, MasterDown]


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("fault_type", FAULTS, ids=[f.code for f in FAULTS])
def test_a_not_now_reply_is_store_unavailable_and_changes_nothing(
        servers: tuple[RedisServer, RedisServer], server: RedisServer, store: RedisKeyStore,
        fault_type: type[Fault], op: Op) -> None:
    primary, other = servers
    op.setup(store)
    name = store.store_key(REF)
    before = primary.client().hgetall(name)
    fault = fault_type()
    fault.inject(primary, other)
    try:
        if (op.writes and (fault.must_refuse is None or op.name in fault.must_refuse)) \
                or fault.refuses_reads:
            with pytest.raises(StoreUnavailable) as info:
                op.call(store)
            assert fault.code in str(info.value)
            assert info.value.key == REF.key
        elif op.writes:  # OOM: refused and nothing written, or done whole
            try:
                op.call(store)
            except StoreUnavailable as exc:
                assert fault.code in str(exc)
            else:
                return
        else:
            assert op.call(store) is not None  # reads are served: the record is there
    finally:
        fault.clear(primary, other)
    assert primary.client().hgetall(name) == before  # nothing half-written
    # The very same call succeeds once the store is back: the reply was "not now".
    outcome = op.call(store)
    assert outcome is None or outcome is not False


@pytest.mark.parametrize("fault_type", [Busy, MasterDown], ids=["BUSY", "MASTERDOWN"])
def test_store_wide_calls_see_a_not_now_reply_as_unavailable(
        servers: tuple[RedisServer, RedisServer], server: RedisServer, store: RedisKeyStore,
        fault_type: type[Fault]) -> None:
    primary, other = servers
    _reserved(store)
    fault = fault_type()
    fault.inject(primary, other)
    try:
        # MASTERDOWN lets PING and TIME through (they touch no data); BUSY refuses them too.
        for call in (lambda: store.get(REF), lambda: list(store.entries()),
                     lambda: store.memory_usage([store.store_key(REF)])):
            with pytest.raises(StoreUnavailable, match=fault.code):
                call()
        if fault.code == "BUSY":
            for call in (store.ping, store.now_ms):
                with pytest.raises(StoreUnavailable, match="BUSY"):
                    call()
    finally:
        fault.clear(primary, other)
    assert [e.record.key for e in store.entries() if e.record] == [REF.key]


def test_loading_is_store_unavailable(tmp_path: Any) -> None:
    """A server loading its data set answers LOADING (redis-py's BusyLoadingError)."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_service("redis-server is not on PATH")
    assert binary is not None
    seed = RedisServer().start()
    client = seed.client()
    pipe = client.pipeline(transaction=False)
    for index in range(20_000):
        pipe.set(f"filler:{index}", "x")
    pipe.execute()
    client.save()
    seed.stop()
    # key-load-delay (µs per key): loading 20,000 keys takes a few seconds.
    process = subprocess.Popen(
        [binary, "--port", str(seed.port), "--bind", "127.0.0.1", "--dir", str(seed.dir),
         "--dbfilename", "dump.rdb", "--save", "", "--key-load-delay", "300",
         "--loading-process-events-interval-bytes", "1024"],  # answer clients while loading
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = RedisKeyStore.from_url(seed.url(), prefix=PREFIX)
    try:
        probe = redis.Redis(port=seed.port, retry=None)

        def loading() -> bool:
            try:
                probe.ping()
            except redis.exceptions.BusyLoadingError:
                return True
            except redis.ConnectionError:
                return False
            raise AssertionError("the server finished loading before the test could run")
        _wait(loading, "the server to start loading")
        for op in OPS:
            with pytest.raises(StoreUnavailable, match=r"LOADING Redis is loading"):
                op.call(store)
    finally:
        store.close()
        process.kill()
        process.wait(10)
        seed.close()


# -- "never": ACLs and credentials ----------------------------------------------------------

def _store_as(server: RedisServer, user: str) -> RedisKeyStore:
    return RedisKeyStore.from_url(f"redis://{user}:pw@127.0.0.1:{server.port}/0", prefix=PREFIX)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_noperm_without_access_to_the_keys_is_misconfigured(
        server: RedisServer, store: RedisKeyStore, op: Op) -> None:
    op.setup(store)
    server.client().acl_setuser("elsewhere", enabled=True, passwords=["+pw"],
                                keys=["other:*"], commands=["+@all"])
    limited = _store_as(server, "elsewhere")
    try:
        with pytest.raises(StoreMisconfigured) as info:
            op.call(limited)
    finally:
        limited.close()
    message = str(info.value)
    assert "NOPERM" in message and "ACL" in message and f"~{PREFIX}*" in message
    assert info.value.key == REF.key


@pytest.mark.parametrize("op", [op for op in OPS if op.writes],
                         ids=[op.name for op in OPS if op.writes])
def test_noperm_without_scripts_is_misconfigured(server: RedisServer, store: RedisKeyStore,
                                                 op: Op) -> None:
    op.setup(store)
    server.client().acl_setuser("noscripts", enabled=True, passwords=["+pw"], keys=["*"],
                                commands=["+@all", "-evalsha", "-eval", "-script"])
    limited = _store_as(server, "noscripts")
    try:
        with pytest.raises(StoreMisconfigured, match=r"NOPERM.*'evalsha'.*EVALSHA"):
            op.call(limited)
    finally:
        limited.close()


def test_the_documented_acl_is_enough(server: RedisServer, store: RedisKeyStore) -> None:
    """The permissions a NOPERM message asks for are all the library needs."""
    commands = ["+" + c.lower().replace(" ", "|") for c in REQUIRED_COMMANDS]
    server.client().acl_setuser("idem", enabled=True, passwords=["+pw"],
                                keys=[f"{PREFIX}*"], commands=commands)
    limited = _store_as(server, "idem")
    try:
        for op in OPS:
            server.client().flushall()
            op.setup(store)
            op.call(limited)
        assert [e.store_key for e in limited.entries()] == [limited.store_key(REF)]
        limited.ping()
        assert limited.now_ms() > 0
    finally:
        limited.close()


def test_wrong_password_is_misconfigured_not_unreachable(server: RedisServer) -> None:
    server.client().acl_setuser("idem", enabled=True, passwords=["+right"], keys=["*"],
                                commands=["+@all"])
    store = RedisKeyStore.from_url(f"redis://idem:wrong@127.0.0.1:{server.port}/0",
                                   prefix=PREFIX)
    try:
        with pytest.raises(StoreMisconfigured, match="credentials") as info:
            store.get(REF)
        assert "wrong" not in str(info.value)  # the password is never shown
        with pytest.raises(StoreMisconfigured, match="credentials"):
            store.ping()
    finally:
        store.close()


# -- a record that is not ours ------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("kind", ["string", "list"])
def test_another_type_under_a_record_name_is_corrupt_record(
        server: RedisServer, store: RedisKeyStore, op: Op, kind: str) -> None:
    name = store.store_key(REF)
    if kind == "string":
        server.client().set(name, "not a record")
    else:
        server.client().rpush(name, "not", "a", "record")
    if op.name == "entry":  # the CLI's view: an entry that carries the error
        entry = op.call(store)
        assert entry.store_key == name and isinstance(entry.error, CorruptRecord)
        assert "WRONGTYPE" in str(entry.error)
        return
    with pytest.raises(CorruptRecord, match="WRONGTYPE") as info:
        op.call(store)
    assert info.value.key == name
    assert server.client().type(name).decode() == kind  # left as it was


@pytest.mark.parametrize("op", [op for op in OPS if op.name in ("reserve", "claim", "get")],
                         ids=["reserve", "claim", "get"])
def test_a_hand_edited_lease_is_corrupt_record_naming_the_field(
        server: RedisServer, store: RedisKeyStore, op: Op) -> None:
    """A Lua error ("attempt to compare number with nil") from a non-numeric lease."""
    _claimed(store)
    name = store.store_key(REF)
    server.client().hset(name, "l", "soon")
    with pytest.raises(CorruptRecord) as info:
        if op.name == "claim":  # another task's message
            store.claim(REF, task_id="t2", owner="other", fingerprint="fp1",
                        task_name="tasks.charge", lease_ms=60_000, ttl_ms=DAY_MS)
        elif op.name == "reserve":
            store.reserve(REF, task_id="t2", fingerprint="fp1", task_name="tasks.charge",
                          ttl_ms=DAY_MS)
        else:
            op.call(store)
    assert info.value.key == name
    assert "field 'l' is not an integer: 'soon'" in str(info.value)
    entry = store.entry(REF)
    assert entry is not None and isinstance(entry.error, CorruptRecord)


def test_the_owner_repairs_a_hand_edited_lease_by_renewing(
        server: RedisServer, store: RedisKeyStore) -> None:
    """Renew sets the lease without reading it: the running task keeps its claim."""
    _claimed(store)
    server.client().hset(store.store_key(REF), "l", "soon")
    assert store.renew(REF, owner=OWNER, lease_ms=60_000)
    record = store.get(REF)
    assert record is not None and record.owner == OWNER


def test_errors_all_share_the_library_root(server: RedisServer, store: RedisKeyStore) -> None:
    """No raw redis-py exception escapes a store method (callers catch IdempotencyError)."""
    server.client().set(store.store_key(REF), "x")
    for op in OPS:
        if op.name == "entry":
            continue
        with pytest.raises(IdempotencyError):
            op.call(store)


# -- the CLI: a store problem of any kind is exit code 3 with a message, never a traceback ----

def test_cli_reports_each_kind_of_store_error_with_exit_code_3(
        servers: tuple[RedisServer, RedisServer], server: RedisServer,
        store: RedisKeyStore) -> None:
    from celery_idempotency.cli.session import EXIT_STORE
    from tests.cli.conftest import run_standalone

    primary, other = servers
    _claimed(store)
    url = server.url()
    fault = Busy()
    fault.inject(primary, other)
    try:
        busy = run_standalone("--store-url", url, "--prefix", PREFIX, "show", REF.key)
    finally:
        fault.clear(primary, other)
    assert busy.code == EXIT_STORE, busy.err
    assert "is unavailable: BUSY Redis is busy" in busy.err

    server.client().acl_setuser("nokeys", enabled=True, passwords=["+s3cret"],
                                keys=["other:*"], commands=["+@all"])
    denied = run_standalone("--store-url", f"redis://nokeys:s3cret@127.0.0.1:{server.port}/0",
                            "--prefix", PREFIX, "list")
    assert denied.code == EXIT_STORE, denied.err
    assert "refuses for good" in denied.err and "NOPERM" in denied.err
    assert "s3cret" not in denied.err

    server.client().delete(store.store_key(REF))
    server.client().set(store.store_key(REF), "x")
    corrupt = run_standalone("--store-url", url, "--prefix", PREFIX, "release", REF.key,
                             "--scope", REF.scope)
    for result in (busy, denied, corrupt):
        assert "Traceback" not in result.err
    assert corrupt.code == EXIT_STORE, corrupt.err
    assert "WRONGTYPE" in corrupt.err and store.store_key(REF) in corrupt.err
