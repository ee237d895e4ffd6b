"""A store that may evict records is refused (store/eviction.py).

The store is a private redis-server per test (``own_redis``) whose ``maxmemory`` and
``maxmemory-policy`` the test sets; the broker stays on the session server. Publishing is
refused before anything is sent; a worker refuses to run a message that got through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_idempotency import (
    IdempotentTask,
    RecordRef,
    RedisKeyStore,
    StoreMisconfigured,
    StoreUnavailable,
    open_store,
)
from celery_idempotency.store.eviction import EvictionGuard, read_policies
from tests.integration import app as itest
from tests.integration.app import charge
from tests.support.apps import forget_idempotency_settings
from tests.support.integration import (
    BROKER_DB,
    STORE_DB,
    Effects,
    Stack,
    new_order_id,
    redis_queue_length,
    redis_stack,
    unique,
    use_stack,
    wait_for,
)
from tests.support.services import RedisCluster, RedisSentinel, RedisServer

FIX = "CONFIG SET maxmemory-policy noeviction"
OPT_OUT = "idempotency_allow_evicting_store"


def set_policy(client: redis.Redis, policy: str, maxmemory: str = "100mb") -> None:
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", maxmemory)


@pytest.fixture
def store_server(own_redis: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis.client()
    yield client
    client.close()


def stack_on(redis_server: RedisServer, own_redis: RedisServer, *, store_url: str | None = None,
             **conf: object) -> Stack:
    made = redis_stack(redis_server, store=own_redis, idempotency_store_timeout=0.5, **conf)
    if store_url is not None:
        made = Stack(made.broker_url, store_url, made.effects_url, made.queue, made.extra_conf)
    use_stack(itest.app, made)
    itest.app.conf[OPT_OUT] = conf.get(OPT_OUT, False)
    return made


def queued(redis_server: RedisServer, stack: Stack) -> int:
    return redis_queue_length(redis_server.client(BROKER_DB), stack.queue)


@pytest.fixture(autouse=True)
def _forget_opt_out() -> Iterator[None]:
    yield
    itest.app.conf.pop(OPT_OUT, None)
    forget_idempotency_settings(itest.app)


# -- refused, accepted -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_an_evicting_store_is_refused_at_publish(redis_server: RedisServer,
                                                 own_redis: RedisServer,
                                                 store_server: redis.Redis,
                                                 policy: str) -> None:
    set_policy(store_server, policy)
    stack = stack_on(redis_server, own_redis)
    with pytest.raises(StoreMisconfigured) as caught:
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    message = str(caught.value)
    assert f"maxmemory-policy {policy}" in message and "maxmemory 104857600" in message
    assert FIX in message and f"{OPT_OUT} = True" in message
    assert queued(redis_server, stack) == 0  # nothing was published
    assert store_server.dbsize() == 0  # and nothing reserved


@pytest.mark.parametrize(("policy", "maxmemory"), [("noeviction", "100mb"),
                                                   ("allkeys-lru", "0")])
def test_a_store_that_cannot_evict_is_accepted(redis_server: RedisServer, own_redis: RedisServer,
                                               store_server: redis.Redis, policy: str,
                                               maxmemory: str) -> None:
    set_policy(store_server, policy, maxmemory)
    stack = stack_on(redis_server, own_redis)
    charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    assert queued(redis_server, stack) == 1


def test_the_opt_out_accepts_an_evicting_store_with_a_warning(
        redis_server: RedisServer, own_redis: RedisServer, store_server: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    set_policy(store_server, "allkeys-lru")
    stack = stack_on(redis_server, own_redis, **{OPT_OUT: True})
    with caplog.at_level(logging.WARNING, logger="celery_idempotency"):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    assert queued(redis_server, stack) == 2
    warnings = [r.getMessage() for r in caplog.records if "may evict records" in r.getMessage()]
    assert len(warnings) == 1 and "allkeys-lru" in warnings[0]  # once per store


def test_the_policy_is_read_once_per_store_not_per_task(redis_server: RedisServer,
                                                        own_redis: RedisServer,
                                                        store_server: redis.Redis) -> None:
    set_policy(store_server, "noeviction")
    stack_on(redis_server, own_redis)
    store_server.config_resetstat()
    for _ in range(5):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    stats = store_server.info("commandstats")
    assert stats["cmdstat_config|get"]["calls"] == 1
    assert "cmdstat_info" not in stats


def test_fixing_the_policy_takes_effect_without_a_restart(redis_server: RedisServer,
                                                         own_redis: RedisServer,
                                                         store_server: redis.Redis) -> None:
    set_policy(store_server, "volatile-lru")
    stack = stack_on(redis_server, own_redis)
    with pytest.raises(StoreMisconfigured):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    store_server.config_set("maxmemory-policy", "noeviction")  # the fix the error names
    charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    assert queued(redis_server, stack) == 1


def test_an_unreachable_store_is_not_remembered_as_checked(redis_server: RedisServer,
                                                           own_redis: RedisServer) -> None:
    stack = stack_on(redis_server, own_redis)
    own_redis.stop()
    with pytest.raises(StoreUnavailable):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    own_redis.extra_args = ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    own_redis.start()
    with pytest.raises(StoreMisconfigured, match="allkeys-lru"):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    assert queued(redis_server, stack) == 0


# -- CONFIG denied ---------------------------------------------------------------------------------

def acl_user_url(own_redis: RedisServer, client: redis.Redis, *rules: str) -> str:
    client.acl_setuser("limited", enabled=True, passwords=["+limited-pw"], keys=["*"],
                       channels=["*"], commands=["+@all", *rules])
    return f"redis://limited:limited-pw@127.0.0.1:{own_redis.port}/{STORE_DB}"


@pytest.mark.parametrize(("policy", "refused"), [("allkeys-lru", True), ("noeviction", False)])
def test_where_config_is_denied_info_decides(redis_server: RedisServer, own_redis: RedisServer,
                                             store_server: redis.Redis, policy: str,
                                             refused: bool) -> None:
    set_policy(store_server, policy)
    url = acl_user_url(own_redis, store_server, "-config")
    with pytest.raises(redis.exceptions.NoPermissionError):  # CONFIG really is denied
        redis.Redis.from_url(url).config_get("maxmemory")
    stack = stack_on(redis_server, own_redis, store_url=url)
    if refused:
        with pytest.raises(StoreMisconfigured, match=r"allkeys-lru.*\(from INFO memory\)"):
            charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
        assert queued(redis_server, stack) == 0
    else:
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
        assert queued(redis_server, stack) == 1


def test_where_config_and_info_are_denied_the_store_is_refused_unless_opted_out(
        redis_server: RedisServer, own_redis: RedisServer, store_server: redis.Redis) -> None:
    set_policy(store_server, "noeviction")
    url = acl_user_url(own_redis, store_server, "-config", "-info")
    stack_on(redis_server, own_redis, store_url=url)
    with pytest.raises(StoreMisconfigured, match="cannot tell whether"):
        charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    stack = stack_on(redis_server, own_redis, store_url=url, **{OPT_OUT: True})
    charge.apply_async((new_order_id(),), idempotency_key=unique("k"))
    assert queued(redis_server, stack) == 1


# -- Cluster and Sentinel ---------------------------------------------------------------------

def test_every_cluster_primary_is_checked(redis_cluster: RedisCluster) -> None:
    store = open_store(redis_cluster.url())
    assert isinstance(store, RedisKeyStore)
    assert len(read_policies(store.client)) == 3
    last = redis_cluster.nodes[-1]
    set_policy(last.client(), "volatile-ttl")
    try:
        with pytest.raises(StoreMisconfigured) as caught:
            EvictionGuard().check(store, allow_evicting=False)
        assert f"127.0.0.1:{last.port}: maxmemory-policy volatile-ttl" in str(caught.value)
        assert str(redis_cluster.nodes[0].port) not in str(caught.value)
    finally:
        set_policy(last.client(), "noeviction", "0")
        store.close()


def test_the_sentinel_master_is_checked(redis_sentinel: RedisSentinel) -> None:
    store = open_store(redis_sentinel.url(3))
    set_policy(redis_sentinel.master.client(), "allkeys-random")
    try:
        with pytest.raises(StoreMisconfigured,
                           match="master of 'idem-master': maxmemory-policy allkeys-random"):
            EvictionGuard().check(store, allow_evicting=False)
    finally:
        set_policy(redis_sentinel.master.client(), "noeviction", "0")
        store.close()


# -- at execution, and why -------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_a_worker_refuses_to_run_on_an_evicting_store(redis_server: RedisServer,
                                                      own_redis: RedisServer,
                                                      store_server: redis.Redis,
                                                      tmp_path: Path, policy: str) -> None:
    stack = stack_on(redis_server, own_redis, idempotency_store_retry_max_delay=1.0)
    order = new_order_id()
    # Published while the store was fine; the policy changes before a worker runs it.
    charge.apply_async((order,), idempotency_key=unique("k"))
    set_policy(store_server, policy)
    worker = stack.worker(tmp_path).start()
    effects = Effects(stack.effects())
    try:
        wait_for(lambda: f"maxmemory-policy {policy}" in worker.output(),
                 what="the refusal", worker=worker)
        assert "idempotency store misconfigured" in worker.output()
        assert FIX in worker.output()
        assert effects.count("charge", order) == 0  # the task did not run
        # Not lost either: once the policy is fixed, the message runs, once.
        store_server.config_set("maxmemory-policy", "noeviction")
        wait_for(lambda: effects.count("charge", order) == 1, what="the run after the fix",
                 worker=worker)
    finally:
        worker.stop()
    assert effects.count("charge", order) == 1


def test_with_the_opt_out_an_evicted_record_runs_its_task_again(own_redis: RedisServer) -> None:
    """Why the store is refused: an evicted record is forgotten, and the key runs again."""
    client = own_redis.client()
    set_policy(client, "volatile-lru", "3mb")
    app = itest.app.__class__("evicted", set_as_current=False)
    app.conf.update(task_always_eager=True, idempotency_store_url=own_redis.url(),
                    **{OPT_OUT: True})
    runs: list[int] = []

    @app.task(base=IdempotentTask, name="evicted.charge")
    def pay(order: int) -> int:
        runs.append(order)
        return order

    pay.apply_async((1,), idempotency_key="order-1")
    pay.apply_async((1,), idempotency_key="order-1")
    assert runs == [1]  # deduplicated while the record is there
    name = RecordRef("evicted.charge", "order-1").store_key("idem:")
    filler = b"x" * 10_000
    for index in range(5_000):  # up to 50 MB of other keys with a TTL, against 3 MB
        client.set(f"filler:{index}", filler, ex=3600)
        if index % 50 == 0 and not client.exists(name):
            break
    assert not client.exists(name) and client.info("stats")["evicted_keys"] > 0
    pay.apply_async((1,), idempotency_key="order-1")
    assert runs == [1, 1]  # the same key ran twice
