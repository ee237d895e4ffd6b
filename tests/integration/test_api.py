"""The example HTTP API (examples/api.py) over real HTTP, against a real worker: the client's
Idempotency-Key header decides what runs, as the README's curl walk-through shows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.services import RedisServer, free_port
from tests.support.workers import ROOT, Worker


class Api:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, key: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, method=method, data=b"" if
                                         method == "POST" else None)
        if key is not None:
            request.add_header("Idempotency-Key", key)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_for_result(self, key: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.call("GET", f"/receipts/{key}")
            if status == 200 and body["state"] in ("SUCCESS", "FAILURE"):
                return body
            time.sleep(0.1)
        raise AssertionError(f"no result for {key!r} after {timeout} s: {body}")


@pytest.fixture(scope="module")
def shop_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    server = RedisServer().start()
    namespace = f"api-{uuid.uuid4().hex[:8]}"
    env = {"BROKER_URL": server.url(0), "IDEMPOTENCY_STORE_URL": server.url(1),
           "RECEIPTS_URL": server.url(2), "SHOP_NAMESPACE": namespace}
    yield env
    server.close()


@pytest.fixture(scope="module")
def api(shop_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    logs = tmp_path_factory.mktemp("api")
    worker = Worker("examples.shop", shop_env, queues=shop_env["SHOP_NAMESPACE"], name="api-w",
                    log=logs / "worker.log").start()
    port = free_port()
    with (logs / "api.log").open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "examples.api", "run", "--host",
             "127.0.0.1", "--port", str(port)],
            env={**os.environ, **shop_env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        client = Api(f"http://127.0.0.1:{port}")
        try:
            _wait_until_serving(client, server, logs / "api.log")
            yield client
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)
            worker.stop()


def _wait_until_serving(client: Api, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"API exited: {log.read_text()}")
        try:
            client.call("GET", "/receipts/probe")
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"API not serving: {log.read_text()}")


def receipts_sent(env: dict[str, str], order_id: int) -> int:
    client = redis.Redis.from_url(env["RECEIPTS_URL"])
    return int(client.get(f"{env['SHOP_NAMESPACE']}:receipts:{order_id}:email") or 0)


def test_retried_request_gets_the_same_task_and_one_receipt(api: Api,
                                                            shop_env: dict[str, str]) -> None:
    key = f'"{uuid.uuid4()}"'
    first = api.call("POST", "/orders/42/receipt", key)
    retries = [api.call("POST", "/orders/42/receipt", key) for _ in range(3)]
    assert first[0] == 202 and first[1]["duplicate"] is False
    assert {status for status, _ in retries} == {202}
    assert {body["task_id"] for _, body in retries} == {first[1]["task_id"]}
    assert all(body["duplicate"] for _, body in retries)
    result = api.wait_for_result(first[1]["idempotency_key"])
    assert result["task_id"] == first[1]["task_id"]
    assert result["result"] == {"order_id": 42, "channel": "email", "sent": True,
                                "receipt_no": 1}
    time.sleep(0.5)  # a duplicate run, if any, would have counted by now
    assert receipts_sent(shop_env, 42) == 1


def test_same_key_for_another_order_is_422(api: Api) -> None:
    key = str(uuid.uuid4())
    assert api.call("POST", "/orders/7/receipt", key)[0] == 202
    status, body = api.call("POST", "/orders/8/receipt", key)
    assert status == 422 and "different task arguments" in body["error"]


@pytest.mark.parametrize(("header", "message"), [
    (None, "required"),
    ('""', "empty"),
    ('"' + "x" * 300 + '"', "255"),
    ("two words", "quoted string or a token"),
])
def test_missing_or_malformed_key_is_400(api: Api, header: str | None, message: str) -> None:
    status, body = api.call("POST", "/orders/9/receipt", header)
    assert status == 400 and message in body["error"]


def test_unknown_key_is_404(api: Api) -> None:
    status, body = api.call("GET", f"/receipts/{uuid.uuid4()}")
    assert status == 404 and "no receipt request" in body["error"]
