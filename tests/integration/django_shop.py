"""The example Django project (examples/django_shop) as the end-to-end tests run it: migrated
into a private SQLite file, served by Django's own development server, its receipts sent by a
real ``celery worker`` of its Celery app, with the broker and the idempotency store on two
private redis-servers (so that a test can stop the store alone). What happened is read from
outside: HTTP responses, the SQLite file, the e-mail outbox (the file e-mail backend), the
worker's log and the store."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import redis

from celery_idempotency import KeyState, KeyStore, Record, RecordRef, RedisKeyStore, open_store
from tests.support.integration import redis_queue_length, unique, wait_for
from tests.support.services import RedisServer, free_port
from tests.support.workers import ROOT, Worker

PROJECT = ROOT / "examples" / "django_shop"
TASK_NAME = "orders.send_receipt"
KEY_PREFIX = "shop:idem:"  # CELERY_IDEMPOTENCY_KEY_PREFIX in the example's settings
TTL = 3600  # given to the example as SHOP_IDEMPOTENCY_TTL (its own default is a day)


class DjangoShop:
    """The running example: ``post`` orders, then read orders, receipts and the store."""

    def __init__(self, workdir: Path, broker: RedisServer, store: RedisServer) -> None:
        self.workdir = workdir
        self.db = workdir / "shop.sqlite3"
        self.outbox = workdir / "outbox"
        self.port = free_port()
        self.store_server = store  # its own server, so that a test can stop it
        self.store_url = store.url(1)
        self.env = {
            "DJANGO_SETTINGS_MODULE": "shop_site.settings",
            "SHOP_DB": str(self.db), "SHOP_OUTBOX": str(self.outbox),
            "SHOP_BROKER_URL": broker.url(0), "SHOP_IDEMPOTENCY_STORE_URL": self.store_url,
            "SHOP_QUEUE": unique("django-shop"), "SHOP_IDEMPOTENCY_TTL": str(TTL),
            # The example's own modules (shop_site, orders) are found as in its directory.
            "PYTHONPATH": f"{PROJECT}{os.pathsep}{ROOT}",
        }
        self.server: subprocess.Popen[bytes] | None = None
        self.worker: Worker | None = None
        self.store: KeyStore | None = None

    def start(self) -> DjangoShop:
        subprocess.run([sys.executable, "manage.py", "migrate", "--verbosity", "0"],
                       cwd=PROJECT, env={**os.environ, **self.env}, check=True, timeout=120)
        worker = Worker("shop_site", self.env, name=unique("django-w"),
                        queues=self.env["SHOP_QUEUE"], log=self.workdir / "worker.log")
        # Worker puts the repository root on PYTHONPATH; the example needs its own dir too.
        worker.env["PYTHONPATH"] = self.env["PYTHONPATH"]
        self.worker = worker.start()
        with (self.workdir / "server.log").open("wb") as log:
            self.server = subprocess.Popen(
                [sys.executable, "manage.py", "runserver", "--noreload",
                 f"127.0.0.1:{self.port}"],
                cwd=PROJECT, env={**os.environ, **self.env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._serving, what="the Django development server", timeout=30)
        self.store = open_store(self.store_url, prefix=KEY_PREFIX)
        return self

    def _serving(self) -> bool:
        assert self.server is not None
        if self.server.poll() is not None:
            raise RuntimeError(f"runserver exited:\n{self.server_log()[-3000:]}")
        return self.post_raw(None, b"")[0] > 0

    def close(self) -> None:
        if self.server is not None and self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGTERM)
            self.server.wait(timeout=10)
        if self.worker is not None:
            self.worker.stop()
        if self.store is not None:
            self.store.close()

    def server_log(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- requests ----------------------------------------------------------------------------

    def post_raw(self, key: str | None, body: bytes) -> tuple[int, Any]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/orders", data=body,
                                         method="POST")
        request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header("Idempotency-Key", key)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")
        except (ConnectionError, urllib.error.URLError):
            return 0, None

    def order(self, key: str, *, sku: str = "mug", quantity: int = 1,
              email: str = "buyer@example.com") -> tuple[int, Any]:
        body = json.dumps({"sku": sku, "quantity": quantity, "email": email}).encode()
        return self.post_raw(f'"{key}"', body)  # the draft's Structured Field string

    # -- what happened -----------------------------------------------------------------------

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db, timeout=20) as connection:
            return list(connection.execute(sql, params))

    def orders_for(self, key: str) -> list[tuple[Any, ...]]:
        return self.query("SELECT id, sku, quantity, email FROM orders_order "
                          "WHERE idempotency_key = ?", key)

    def stock(self, sku: str) -> int:
        return int(self.query("SELECT stock FROM orders_product WHERE sku = ?", sku)[0][0])

    def receipts_for(self, key: str) -> int:
        """Receipt e-mails sent for the order with this key (the file backend appends every
        message to a file in the outbox; the receipt quotes the key as its reference)."""
        if not self.outbox.exists():
            return 0
        needle = f"\nreference: {key}\n"
        return sum(path.read_text(errors="replace").count(needle)
                   for path in self.outbox.iterdir())

    def wait_for_receipt(self, key: str) -> int:
        return wait_for(lambda: self.receipts_for(key), what=f"the receipt of {key!r}",
                        worker=self.worker)

    def received(self) -> list[str]:
        """Ids of the receipt tasks the worker received, in order (its log)."""
        assert self.worker is not None
        pattern = re.compile(rf"Task {re.escape(TASK_NAME)}\[([\w-]+)\] received")
        return pattern.findall(self.worker.output())

    def record(self, key: str) -> Record | None:
        assert self.store is not None
        return self.store.get(RecordRef(TASK_NAME, key))

    def wait_for_succeeded(self, key: str) -> Record:
        """The key's record once the worker has written the task's outcome (just after the
        receipt went out)."""
        def succeeded() -> Record | None:
            record = self.record(key)
            return record if record is not None and record.state is KeyState.SUCCEEDED else None

        return wait_for(succeeded, what=f"key {key!r} to be succeeded", worker=self.worker)

    def record_ttl_ms(self, key: str) -> int:
        assert isinstance(self.store, RedisKeyStore)
        return int(self.store.client.pttl(self.store.store_key(RecordRef(TASK_NAME, key))))

    def queued_messages(self) -> int:
        """Messages waiting in the example's queue on the Redis broker."""
        client = redis.Redis.from_url(self.env["SHOP_BROKER_URL"])
        try:
            return redis_queue_length(client, self.env["SHOP_QUEUE"])
        finally:
            client.close()

    def barrier(self) -> None:
        """Order once more and wait for its receipt: every message published before it has
        then been received by the worker (one queue, taken in order)."""
        key = unique("barrier")
        status, body = self.order(key)
        assert status == 201, body
        self.wait_for_receipt(key)
