"""Django: `celery_idempotency.django.IdempotentDjangoTask` and the example project.

In this process (Django configured with ``settings.configure``, a SQLite file, a private
redis-server as broker and store): settings through Celery's ``CELERY_`` namespace, and what
``apply_async_on_commit`` does on commit, on rollback and when the store is down, in real
transactions. Then the example project (examples/django_shop) end to end: Django's development
server, a real worker, real Redis, requests over HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery

from celery_idempotency import (
    ConfigurationError,
    IdempotencyKeyMismatch,
    IdempotentResult,
    InvalidIdempotencyKey,
    KeyState,
    RecordRef,
    StoreUnavailable,
    idempotency_key,
)
from tests.integration.django_shop import PROJECT, TTL, DjangoShop
from tests.support.apps import point_app_at
from tests.support.integration import (
    PublishLog,
    new_order_id,
    redis_queue_length,
    unique,
)
from tests.support.services import RedisServer
from tests.support.skipping import IN_CI
from tests.support.workers import ROOT

if not IN_CI:  # the test extra installs Django; without it, skip locally
    pytest.importorskip("django")

import django
from celery.contrib.django.task import DjangoTask
from celery.fixups.django import DjangoFixup
from django.conf import settings
from django.db import connection, transaction

from celery_idempotency.django import IdempotentDjangoTask, PendingPublish


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


@dataclass
class InProcess:
    """The publishing side in this process: a Celery app configured from Django's settings."""

    app: Celery
    ship: Any  # the task, an IdempotentDjangoTask
    server: RedisServer
    queue: str

    def record(self, key: str) -> Any:
        return self.ship.idem_store().get(RecordRef(self.ship.name, key))

    def queued(self) -> int:
        client = self.server.client(0)
        try:
            return redis_queue_length(client, self.queue)
        finally:
            client.close()


def ledger_rows(note: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM ledger WHERE note = %s", [note])
        return int(cursor.fetchone()[0])


def write_ledger(note: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO ledger (note) VALUES (%s)", [note])


@pytest.fixture(scope="module")
def inproc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    server = RedisServer().start()
    queue = unique("django-inproc")
    if not settings.configured:
        settings.configure(
            DATABASES={"default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path_factory.mktemp("django") / "inproc.sqlite3")}},
            INSTALLED_APPS=[], USE_TZ=True, SECRET_KEY="test-only",
            # What a project's settings.py says; Celery reads it through its namespace.
            CELERY_BROKER_URL=server.url(0), CELERY_TASK_DEFAULT_QUEUE=queue,
            CELERY_IDEMPOTENCY_STORE_URL=server.url(1), CELERY_IDEMPOTENCY_TTL=900,
            CELERY_IDEMPOTENCY_KEY_PREFIX="inproc:")
        django.setup()
    app = Celery("django-inproc", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")

    @app.task(base=IdempotentDjangoTask, name="django_inproc.ship", shared=False)
    def ship(order_id: int) -> int:
        return order_id

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS ledger (note TEXT NOT NULL)")
    yield InProcess(app, ship, server, queue)
    connection.close()
    server.close()


@pytest.fixture
def published() -> Iterator[PublishLog]:
    with PublishLog() as log:
        yield log


@pytest.fixture
def store_down_later(inproc: InProcess, own_redis: RedisServer) -> Iterator[RedisServer]:
    """The task's store on a redis-server of the test's own, which the test stops."""
    point_app_at(inproc.app, idempotency_store_url=own_redis.url(1))
    yield own_redis
    point_app_at(inproc.app)  # back to the settings' store


# -- settings and class ----------------------------------------------------------------------


def test_settings_come_from_the_django_settings_module_namespace(inproc: InProcess) -> None:
    config = inproc.ship.idem_config()
    assert config.store_url == inproc.server.url(1)
    assert config.ttl == 900
    assert config.key_prefix == "inproc:"


def test_a_misspelt_idempotency_setting_in_django_settings_is_refused(
        inproc: InProcess) -> None:
    app = Celery("django-misspelt", set_as_current=False)
    app.config_from_object({"CELERY_IDEMPOTENCY_STORE_URL": "memory://",
                            "CELERY_IDEMPOTENCY_TTLL": 60}, namespace="CELERY")

    @app.task(base=IdempotentDjangoTask, name="django_misspelt.t", shared=False)
    def t() -> None:
        pass

    with pytest.raises(ConfigurationError, match="idempotency_ttll"):
        t.idem_config()


def test_the_task_is_both_idempotent_and_celerys_django_task(inproc: InProcess) -> None:
    assert isinstance(inproc.ship, DjangoTask)
    assert isinstance(inproc.ship, IdempotentDjangoTask)
    # The idempotent publish comes first, Celery's Django methods are ours.
    assert (inproc.ship.apply_async_on_commit.__func__
            is IdempotentDjangoTask.apply_async_on_commit)


def test_an_explicit_task_cls_survives_celerys_django_fixup() -> None:
    plain = Celery("django-fixup-plain", set_as_current=False)
    DjangoFixup(plain).install()
    ours = Celery("django-fixup-ours", set_as_current=False,
                  task_cls="celery_idempotency.django:IdempotentDjangoTask")
    DjangoFixup(ours).install()
    assert plain.task_cls == "celery.contrib.django.task:DjangoTask"  # the fix-up acts

    @ours.task(name="fixup.t", shared=False)
    def t() -> None:
        pass

    assert isinstance(t, IdempotentDjangoTask)


def test_a_projects_own_django_task_class_composes(inproc: InProcess,
                                                   published: PublishLog) -> None:
    class AuditedTask(DjangoTask):
        def audit(self) -> str:
            return f"audited {self.name}"

    class IdempotentAuditedTask(IdempotentDjangoTask, AuditedTask):
        pass

    @inproc.app.task(base=IdempotentAuditedTask, name="django_inproc.audited", shared=False)
    def audited(order_id: int) -> int:
        return order_id

    key = unique("audited")
    with transaction.atomic():
        first = audited.apply_async_on_commit((1,), idempotency_key=key)
    with transaction.atomic():
        second = audited.apply_async_on_commit((1,), idempotency_key=key)
    assert audited.audit() == "audited django_inproc.audited"
    assert second.result.duplicate and published.ids_for(key) == [first.result.id]


def test_the_package_imports_without_django_and_names_the_extra() -> None:
    script = (
        "import sys; sys.modules['django'] = None\n"  # as if Django were not installed
        "import celery_idempotency, celery_idempotency.http, celery_idempotency.cli\n"
        "try:\n"
        "    import celery_idempotency.django\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pip install 'celery-idempotency[django]'" in done.stdout


# -- on commit, on rollback --------------------------------------------------------------------


def test_publishes_when_the_transaction_commits(inproc: InProcess,
                                                published: PublishLog) -> None:
    key, note = unique("commit"), unique("row")
    with transaction.atomic():
        write_ledger(note)
        pending = inproc.ship.apply_async_on_commit((1,), idempotency_key=key)
        # Nothing yet: no reservation, no message, no handle.
        assert isinstance(pending, PendingPublish)
        assert (pending.key, pending.scope) == (key, "django_inproc.ship")
        assert pending.result is None and not pending.published
        assert inproc.record(key) is None
        assert published.ids_for(key) == []
    assert ledger_rows(note) == 1
    assert isinstance(pending.result, IdempotentResult) and not pending.result.duplicate
    assert published.ids_for(key) == [pending.result.id]
    record = inproc.record(key)
    assert record is not None and record.state is KeyState.PENDING
    assert record.task_id == pending.result.id


def test_nothing_happens_when_the_transaction_rolls_back(inproc: InProcess,
                                                          published: PublishLog) -> None:
    key, note = unique("rollback"), unique("row")
    queued_before = inproc.queued()
    with pytest.raises(Rollback), transaction.atomic():
        write_ledger(note)
        pending = inproc.ship.apply_async_on_commit((2,), idempotency_key=key)
        raise Rollback
    assert ledger_rows(note) == 0
    assert pending.result is None and pending.error is None
    assert inproc.record(key) is None  # no reservation
    assert published.ids_for(key) == []  # no message
    assert inproc.queued() == queued_before
    # The key is free: the next transaction that commits publishes it.
    with transaction.atomic():
        again = inproc.ship.apply_async_on_commit((2,), idempotency_key=key)
    assert again.published and not again.result.duplicate
    assert published.ids_for(key) == [again.result.id]


def test_a_rolled_back_savepoint_takes_its_publish_back(inproc: InProcess,
                                                        published: PublishLog) -> None:
    kept, dropped = unique("kept"), unique("dropped")
    with transaction.atomic():  # e.g. ATOMIC_REQUESTS around the view
        with transaction.atomic():
            pending = inproc.ship.apply_async_on_commit((3,), idempotency_key=kept)
        assert pending.result is None  # the inner block's end is not the commit
        with pytest.raises(Rollback), transaction.atomic():
            inproc.ship.apply_async_on_commit((3,), idempotency_key=dropped)
            raise Rollback
    assert published.ids_for(kept) == [pending.result.id]
    assert published.ids_for(dropped) == [] and inproc.record(dropped) is None


def test_a_retry_with_the_same_key_is_not_sent_again(inproc: InProcess,
                                                     published: PublishLog) -> None:
    key = unique("retry")
    with transaction.atomic():
        first = inproc.ship.apply_async_on_commit((4,), idempotency_key=key)
    with transaction.atomic():
        second = inproc.ship.apply_async_on_commit((4,), idempotency_key=key)
    assert second.result.duplicate and second.result.id == first.result.id
    assert published.ids_for(key) == [first.result.id]


def test_outside_a_transaction_it_publishes_at_once(inproc: InProcess,
                                                    published: PublishLog) -> None:
    key = unique("autocommit")
    pending = inproc.ship.apply_async_on_commit((5,), idempotency_key=key)
    assert pending.published and published.ids_for(key) == [pending.result.id]


def test_delay_on_commit_keeps_the_key_of_the_block_it_was_called_in(
        inproc: InProcess, published: PublishLog) -> None:
    key = unique("context")
    with transaction.atomic(), idempotency_key(key):
        pending = inproc.ship.delay_on_commit(6)
        # The block is over when the transaction commits: the key was taken at the call.
    assert pending.key == key
    assert published.ids_for(key) == [pending.result.id]


def test_a_derived_key_is_known_at_the_call(inproc: InProcess, published: PublishLog) -> None:
    with transaction.atomic():
        pending = inproc.ship.delay_on_commit(new_order_id())
        assert pending.key is not None
    assert published.ids_for(pending.key) == [pending.result.id]


# -- errors: at the call (the transaction rolls back) or at commit -----------------------------


def test_the_same_key_with_other_arguments_raises_inside_the_transaction(
        inproc: InProcess, published: PublishLog) -> None:
    key, note = unique("mismatch"), unique("row")
    with transaction.atomic():
        inproc.ship.apply_async_on_commit((7,), idempotency_key=key)
    with pytest.raises(IdempotencyKeyMismatch), transaction.atomic():
        write_ledger(note)
        inproc.ship.apply_async_on_commit((8,), idempotency_key=key)
    assert ledger_rows(note) == 0  # rolled back with the request
    assert len(published.ids_for(key)) == 1


def test_a_bad_key_or_option_raises_at_the_call(inproc: InProcess) -> None:
    with pytest.raises(InvalidIdempotencyKey), transaction.atomic():
        inproc.ship.apply_async_on_commit((9,), idempotency_key="")
    with pytest.raises(ConfigurationError, match="idempotency_tll"), transaction.atomic():
        inproc.ship.apply_async_on_commit((9,), idempotency_key=unique("k"),
                                          idempotency_tll=5)


def test_store_down_at_the_call_raises_inside_the_transaction(
        inproc: InProcess, store_down_later: RedisServer, published: PublishLog) -> None:
    key, note = unique("down-at-call"), unique("row")
    store_down_later.stop()
    with pytest.raises(StoreUnavailable), transaction.atomic():
        write_ledger(note)
        inproc.ship.apply_async_on_commit((10,), idempotency_key=key)
    assert ledger_rows(note) == 0
    assert published.ids_for(key) == []


def test_store_down_at_commit_is_raised_and_logged_with_the_key(
        inproc: InProcess, store_down_later: RedisServer, published: PublishLog,
        caplog: pytest.LogCaptureFixture) -> None:
    key, note = unique("down-at-commit"), unique("row")
    later_hooks: list[str] = []
    with caplog.at_level(logging.ERROR, logger="celery_idempotency"), \
            pytest.raises(StoreUnavailable), transaction.atomic():
        write_ledger(note)
        pending = inproc.ship.apply_async_on_commit((11,), idempotency_key=key)
        transaction.on_commit(lambda: later_hooks.append("ran"))
        store_down_later.stop()  # after the check at the call, before the commit
    assert ledger_rows(note) == 1  # committed: Django runs on_commit hooks after the commit
    assert isinstance(pending.error, StoreUnavailable) and pending.result is None
    assert published.ids_for(key) == []
    assert later_hooks == []  # Django's robust=False: the hooks after a failing one do not run
    logged = [r for r in caplog.records if r.name == "celery_idempotency"
              and r.levelno == logging.ERROR and key in r.getMessage()]
    assert len(logged) == 1 and "NOT published" in logged[0].getMessage()
    assert "publish it again with the same key" in logged[0].getMessage()
    # The client's retry, with the store back, publishes it once.
    store_down_later.start()
    retried = inproc.ship.apply_async_on_commit((11,), idempotency_key=key)
    assert retried.published and published.ids_for(key) == [retried.result.id]


def test_a_concurrent_publish_with_other_arguments_fails_at_commit_loudly(
        inproc: InProcess, published: PublishLog, caplog: pytest.LogCaptureFixture) -> None:
    key = unique("race")
    with caplog.at_level(logging.ERROR, logger="celery_idempotency"), \
            pytest.raises(IdempotencyKeyMismatch), transaction.atomic():
        pending = inproc.ship.apply_async_on_commit((13,), idempotency_key=key)
        # Another request takes the key with other arguments before this one commits.
        other = inproc.ship.apply_async((14,), idempotency_key=key)
    assert isinstance(pending.error, IdempotencyKeyMismatch)
    assert published.ids_for(key) == [other.id]
    assert any(key in r.getMessage() and "NOT published" in r.getMessage()
               and "needs a new key" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)


def test_fail_open_publishes_unchecked_when_the_store_is_down(
        inproc: InProcess, store_down_later: RedisServer, published: PublishLog,
        caplog: pytest.LogCaptureFixture) -> None:
    point_app_at(inproc.app, idempotency_store_url=store_down_later.url(1),
                 idempotency_on_store_error="fail_open")
    store_down_later.stop()
    key = unique("fail-open")
    with caplog.at_level(logging.WARNING, logger="celery_idempotency"), transaction.atomic():
        pending = inproc.ship.apply_async_on_commit((15,), idempotency_key=key)
    assert pending.published and pending.error is None
    assert len(published.ids_for(key)) == 1
    assert any("not checked before the commit" in r.getMessage() and key in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


def test_store_down_at_commit_with_robust_is_logged_not_raised(
        inproc: InProcess, store_down_later: RedisServer, published: PublishLog,
        caplog: pytest.LogCaptureFixture) -> None:
    key = unique("robust")
    later_hooks: list[str] = []
    with caplog.at_level(logging.ERROR), transaction.atomic():
        pending = inproc.ship.apply_async_on_commit((12,), idempotency_key=key,
                                                    robust=True)
        transaction.on_commit(lambda: later_hooks.append("ran"))
        store_down_later.stop()
    assert isinstance(pending.error, StoreUnavailable)
    assert later_hooks == ["ran"]
    assert published.ids_for(key) == []
    ours = [r for r in caplog.records if r.name == "celery_idempotency" and key in r.getMessage()]
    djangos = [r for r in caplog.records if r.name == "django.db.backends.base"
               and "django_inproc.ship.apply_async_on_commit" in r.getMessage()]
    assert len(ours) == 1 and len(djangos) == 1


# -- the example project, end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DjangoShop]:
    broker, store = RedisServer().start(), RedisServer().start()
    made = DjangoShop(tmp_path_factory.mktemp("django-shop"), broker, store)
    try:
        yield made.start()
    finally:
        made.close()
        broker.close()
        store.close()


def test_a_retried_request_creates_one_order_and_sends_one_receipt(shop: DjangoShop) -> None:
    key = unique("order")
    stock = shop.stock("mug")
    first = shop.order(key, quantity=2)
    second = shop.order(key, quantity=2)  # the client's retry: same key, same body
    assert shop.stock("mug") == stock - 2  # taken once
    assert first[0] == 201 and first[1]["created"] and not first[1]["duplicate"], first
    assert second[0] == 200 and not second[1]["created"] and second[1]["duplicate"], second
    assert second[1]["order_id"] == first[1]["order_id"]
    assert second[1]["task_id"] == first[1]["task_id"]
    assert shop.wait_for_receipt(key) == 1
    shop.barrier()
    assert shop.receipts_for(key) == 1
    assert len(shop.orders_for(key)) == 1
    assert shop.received().count(first[1]["task_id"]) == 1


def test_the_ttl_from_django_settings_is_the_records_ttl(shop: DjangoShop) -> None:
    key = unique("ttl")
    assert shop.order(key)[0] == 201
    shop.wait_for_succeeded(key)
    # SHOP_IDEMPOTENCY_TTL -> CELERY_IDEMPOTENCY_TTL -> idempotency_ttl (default: 7 days).
    assert 0 < shop.record_ttl_ms(key) <= TTL * 1000


def test_a_rolled_back_request_enqueues_nothing(shop: DjangoShop) -> None:
    key = unique("no-stock")
    stock = shop.stock("lamp")
    received_before = len(shop.received())
    status, body = shop.order(key, sku="lamp", quantity=stock + 1)  # more than there is
    assert status == 409, body
    assert shop.orders_for(key) == []  # rolled back
    assert shop.record(key) is None  # no reservation in the store
    assert shop.queued_messages() == 0
    shop.barrier()  # published after the request: received after anything it published
    assert len(shop.received()) == received_before + 1  # the barrier's only
    assert shop.receipts_for(key) == 0
    assert shop.stock("lamp") == stock


def test_the_same_key_with_another_body_is_422(shop: DjangoShop) -> None:
    key = unique("reused")
    assert shop.order(key, quantity=1)[0] == 201
    status, body = shop.order(key, quantity=5)
    assert status == 422, body
    assert "different request body" in body["error"]
    assert [row[2] for row in shop.orders_for(key)] == [1]
    shop.wait_for_receipt(key)
    shop.barrier()
    assert shop.receipts_for(key) == 1


def test_a_missing_or_malformed_key_is_400(shop: DjangoShop) -> None:
    body = b'{"sku": "mug", "quantity": 1, "email": "buyer@example.com"}'
    assert shop.post_raw(None, body)[0] == 400
    assert shop.post_raw('"unterminated', body)[0] == 400
    assert shop.query("SELECT COUNT(*) FROM orders_order WHERE idempotency_key LIKE "
                      "'%unterminated%'") == [(0,)]



def test_operators_inspect_the_shops_keys_with_the_celery_command(shop: DjangoShop) -> None:
    key = unique("inspect")
    assert shop.order(key)[0] == 201
    shop.wait_for_succeeded(key)
    # Store and key prefix come from the Django settings, as the worker's do; the management
    # command is the same click command.
    for command in (["-m", "celery", "-A", "shop_site", "idempotency"],
                    ["manage.py", "idempotency"]):
        done = subprocess.run([sys.executable, *command, "show", key, "--json"], cwd=PROJECT,
                              env={**os.environ, **shop.env}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (command, done.stderr)
        shown = json.loads(done.stdout)
        assert (shown["key"], shown["scope"], shown["state"]) == (
            key, "orders.send_receipt", "succeeded"), command
    # Its exit codes are the CLI's: 1 for a key that is not there.
    missing = subprocess.run([sys.executable, "manage.py", "idempotency", "show",
                              unique("absent")], cwd=PROJECT, env={**os.environ, **shop.env},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1, missing.stderr


def test_an_unreachable_store_is_503_and_writes_nothing(shop: DjangoShop) -> None:
    key = unique("store-down")
    shop.store_server.stop(save=True)
    try:
        status, body = shop.order(key)
    finally:
        shop.store_server.start(keep_data=True)
    assert status == 503, body
    assert shop.orders_for(key) == []
    # The client's retry, once the store is back, goes through.
    assert shop.order(key)[0] == 201
    assert shop.wait_for_receipt(key) == 1
