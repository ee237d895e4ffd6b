"""`IdempotentGroup` and `IdempotentChord` with a real Redis broker, store and result backend
and a real prefork worker: the members reserve their keys in one round trip, and everything
else (results, duplicates, errors, a store that is down, a chord's callback) is what a plain
``celery.group`` gives (tests/integration/group_app.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group

from celery_idempotency import (
    IdempotentChord,
    IdempotentGroup,
    InvalidIdempotencyKey,
    StoreUnavailable,
)
from celery_idempotency.store import RedisKeyStore
from tests.integration import group_app
from tests.integration.group_app import charge, echo, total
from tests.support.apps import forget_idempotency_settings, store_down
from tests.support.counting import counting_round_trips
from tests.support.integration import (
    BROKER_DB,
    TIMEOUT,
    Effects,
    PublishLog,
    Stack,
    new_order_id,
    redis_stack,
    unique,
    use_stack,
)
from tests.support.services import RedisServer
from tests.support.workers import Worker

APP_MODULE = "tests.integration.group_app"
SETTLE = 0.5  # after the outcomes: long enough for a stray second execution to show up
GroupClass = Callable[..., Any]


@pytest.fixture(scope="module")
def tested_app() -> tuple[Celery, str]:
    return group_app.app, APP_MODULE


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tested_app: tuple[Celery, str]) -> Stack:
    """The module's stack, with a Redis result backend (the broker's db) on both sides."""
    made = redis_stack(redis_server, result_backend=redis_server.url(BROKER_DB))
    use_stack(tested_app[0], made)
    return made


@pytest.fixture(autouse=True)
def _running(stack: Stack, worker: Worker) -> None:
    """Every test here needs the module's worker up (and the publisher pointed at it)."""


@pytest.fixture
def publisher_store_down() -> Iterator[Callable[..., None]]:
    """Point the publisher (not the worker) at a store that is down; put it back after."""
    names = ("idempotency_store_url", "idempotency_store_timeout", "idempotency_on_store_error")
    saved = {name: group_app.app.conf.get(name) for name in names}
    yield lambda **settings: (store_down(group_app.app, **settings),
                              forget_idempotency_settings(group_app.app))
    group_app.app.conf.update(saved)
    forget_idempotency_settings(group_app.app)


def warm_store() -> redis.Redis:
    """The publisher's store client, its server holding the reserve script (else the first
    batch takes two more round trips: NOSCRIPT, load, send again)."""
    store = charge.idem_store()
    assert isinstance(store, RedisKeyStore) and isinstance(store.client, redis.Redis)
    charge.apply_async((new_order_id(),)).get(timeout=TIMEOUT)
    return store.client


def members(run: str, slots: list[tuple[str, int]]) -> list[Any]:
    """One keyed call of ``charge`` per ``(slot, order)``: key ``<run>-<slot>``."""
    return [charge.s(order).set(idempotency_key=f"{run}-{slot}") for slot, order in slots]


def sent_under(published: PublishLog, run: str) -> list[str]:
    """The ids of the messages published with a key of ``run``."""
    return [m.task_id for m in published.messages if m.key and m.key.startswith(run)]


def shape(results: list[dict[str, Any]], owners: dict[str, str]) -> list[tuple[Any, ...]]:
    """The results with each task id replaced by the slot of the key it ran for (which of two
    messages of one key runs and which replays is a race, in either kind of group)."""
    return [(r["order_id"], r["amount"], r["run"], owners.get(r["task_id"], "?"))
            for r in results]


def test_the_members_reserve_in_one_round_trip(effects: Effects, published: PublishLog) -> None:
    client = warm_store()
    run = unique("group")
    orders = [new_order_id() for _ in range(20)]
    with counting_round_trips(client) as round_trips:
        result = IdempotentGroup(members(run, [(str(i), o) for i, o in enumerate(orders)]))()
    assert round_trips.count == 1, "the 20 reservations must be one round trip"
    values = result.get(timeout=TIMEOUT)
    assert [v["order_id"] for v in values] == orders
    assert [v["task_id"] for v in values] == [r.id for r in result.results]
    assert all(v["run"] == 1 for v in values)
    time.sleep(SETTLE)
    assert all(effects.count("group.charge", order) == 1 for order in orders)
    assert sorted(sent_under(published, run)) == sorted(r.id for r in result.results)


def test_repeated_and_used_keys_give_what_a_plain_group_gives(effects: Effects,
                                                              published: PublishLog) -> None:
    slots = ["used", "a", "a", "b", "used"]
    shapes, all_orders = [], []
    for kind in (group, IdempotentGroup):
        run = unique("group-same")
        orders = {slot: new_order_id() for slot in slots}
        all_orders += orders.values()
        # The key "used" ran before the group.
        earlier = charge.apply_async((orders["used"],), idempotency_key=f"{run}-used")
        earlier.get(timeout=TIMEOUT)
        result = kind(members(run, [(slot, orders[slot]) for slot in slots]))()
        values = result.get(timeout=TIMEOUT)
        owners = {earlier.id: "used"}
        owners.update({r.id: slot for r, slot in zip(result.results, slots, strict=True)})
        shapes.append([(order_slot, *rest) for order_slot, (_, *rest) in zip(
            slots, shape(values, owners), strict=True)])
        # Every member is sent (a canvas member), the duplicates short-circuit when they run.
        assert sorted(sent_under(published, run)) \
            == sorted([earlier.id, *(r.id for r in result.results)])
    plain, batched = shapes
    assert batched == plain
    assert [s[2] for s in batched] == [1] * len(slots)
    assert [s[3] for s in batched] == slots
    time.sleep(SETTLE)
    assert all(effects.count("group.charge", order) == 1 for order in all_orders)


def test_plain_members_and_chains_go_their_usual_way(effects: Effects) -> None:
    """Members that are not one call of an idempotent task (a plain task, a chain whose first
    step is one) are sent by Celery as it goes; the results are a plain group's."""
    shapes = []
    for kind in (group, IdempotentGroup):
        run = unique("group-mixed")
        first, second = new_order_id(), new_order_id()
        result = kind(charge.s(first).set(idempotency_key=f"{run}-0"), echo.s("plain"),
                      chain(charge.si(second).set(idempotency_key=f"{run}-1"), echo.s()))()
        values = result.get(timeout=TIMEOUT)
        shapes.append([values[0]["order_id"] == first, values[1],
                       values[2]["echo"]["order_id"] == second])
        time.sleep(SETTLE)
        assert effects.count("group.charge", first) == effects.count("group.charge", second) == 1
    assert shapes[1] == shapes[0] == [True, {"echo": "plain"}, True]


def test_a_member_with_a_bad_key_raises_as_in_a_plain_group(published: PublishLog) -> None:
    errors, sent = [], []
    for kind in (group, IdempotentGroup):
        run = unique("group-bad")
        calls = [charge.s(new_order_id()).set(idempotency_key=f"{run}-0"),
                 charge.s(new_order_id()).set(idempotency_key="bad\x01key"),
                 charge.s(new_order_id()).set(idempotency_key=f"{run}-2")]
        with pytest.raises(InvalidIdempotencyKey) as info:
            kind(calls)()
        errors.append((type(info.value), str(info.value)))
        # As a plain group: the members before the bad one were sent, not the ones after.
        sent.append(sorted(m.key.removeprefix(run) for m in published.messages
                           if m.key and m.key.startswith(run)))
    assert errors[1] == errors[0]
    assert sent[1] == sent[0] == ["-0"]


@pytest.mark.parametrize("kind", [group, IdempotentGroup], ids=["group", "IdempotentGroup"])
def test_store_down_raises_and_sends_nothing(kind: GroupClass, published: PublishLog,
                                             publisher_store_down: Callable[..., None]) -> None:
    publisher_store_down()
    with pytest.raises(StoreUnavailable):
        kind(members(unique("group-down"), [("0", new_order_id()), ("1", new_order_id())]))()
    assert published.messages == []


@pytest.mark.parametrize("kind", [group, IdempotentGroup], ids=["group", "IdempotentGroup"])
def test_store_down_under_fail_open_sends_every_member(
        kind: GroupClass, published: PublishLog,
        publisher_store_down: Callable[..., None]) -> None:
    publisher_store_down(idempotency_on_store_error="fail_open")
    orders = [new_order_id() for _ in range(3)]
    result = kind(members(unique("group-open"), [(str(i), o) for i, o in enumerate(orders)]))()
    assert len(published.messages) == 3
    assert [v["order_id"] for v in result.get(timeout=TIMEOUT)] == orders


def test_a_chord_over_the_batched_group_fires_its_callback_once(effects: Effects) -> None:
    client = warm_store()
    run, tag = unique("chord"), unique("tag")
    order = new_order_id()
    header = members(run, [("0", new_order_id()), ("1", order), ("1", order),
                           ("2", new_order_id())])
    with counting_round_trips(client) as round_trips:
        result = IdempotentChord(header, total.s(tag))()
    assert round_trips.count == 1, "the header's 4 reservations must be one round trip"
    assert result.get(timeout=TIMEOUT) == 400
    time.sleep(SETTLE)
    assert effects.count("group.total", tag) == 1
    assert effects.count("group.charge", order) == 1


def test_a_plain_chord_over_an_idempotent_group_still_works(effects: Effects) -> None:
    """``chord(IdempotentGroup(...), body)``: Celery makes the header a plain group again."""
    client = warm_store()
    tag = unique("tag")
    header = IdempotentGroup(members(unique("chord-plain"),
                                     [("0", new_order_id()), ("1", new_order_id())]))
    with counting_round_trips(client) as round_trips:
        result = chord(header, total.s(tag))()
    assert round_trips.count == 2, "a plain header: one round trip per member"
    assert result.get(timeout=TIMEOUT) == 200
    time.sleep(SETTLE)
    assert effects.count("group.total", tag) == 1
