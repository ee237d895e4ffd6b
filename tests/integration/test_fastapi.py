"""celery_idempotency.fastapi over real HTTP, against real ``celery worker`` processes and
private redis-servers.

The example (examples/fastapi_app.py) runs under uvicorn in its own process, next to a
``celery -A examples.shop worker``: the same requests as the Flask example's test
(test_api.py) get the same status codes and task ids. A synchronous endpoint of this module's
own, served by uvicorn in a thread of this process in front of the integration test app, shows
the 409 helper and the 503 handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from celery_idempotency.fastapi import (
    IdempotencyKey,
    OptionalIdempotencyKey,
    conflict_if_in_flight,
    install_exception_handlers,
)
from tests.integration import app as itest
from tests.support.integration import TIMEOUT, Effects, Stack, new_order_id, wait_for
from tests.support.services import RedisServer, free_port
from tests.support.workers import ROOT, Worker

# ---------------------------------------------------------------- the example, under uvicorn


@pytest.fixture(scope="module")
def shop_env() -> Iterator[dict[str, str]]:
    server = RedisServer().start()
    namespace = f"fastapi-{uuid.uuid4().hex[:8]}"
    yield {"BROKER_URL": server.url(0), "IDEMPOTENCY_STORE_URL": server.url(1),
           "RECEIPTS_URL": server.url(2), "SHOP_NAMESPACE": namespace}
    server.close()


@pytest.fixture(scope="module")
def shop_worker(shop_env: dict[str, str],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    worker = Worker("examples.shop", shop_env, queues=shop_env["SHOP_NAMESPACE"],
                    name="fastapi-w",
                    log=tmp_path_factory.mktemp("fastapi-worker") / "worker.log").start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def api(shop_env: dict[str, str], shop_worker: Worker,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    log_path = tmp_path_factory.mktemp("fastapi") / "uvicorn.log"
    port = free_port()
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--host",
             "127.0.0.1", "--port", str(port)],
            env={**os.environ, **shop_env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                _wait_until_serving(client, lambda: server.poll() is not None, log_path)
                yield client
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)


def _wait_until_serving(client: httpx.Client, exited: Any, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if exited():
            raise RuntimeError(f"the API exited: {log.read_text()}")
        try:
            client.get("/openapi.json")
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"the API is not serving: {log.read_text()}")


@contextlib.contextmanager
def frozen(worker: Worker) -> Iterator[None]:
    """SIGSTOP the worker and its pool children: what it has not finished stays in flight."""
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)


def post_receipt(api: httpx.Client, order_id: int, key: str | None) -> httpx.Response:
    return api.post(f"/orders/{order_id}/receipt",
                    headers={} if key is None else {"Idempotency-Key": key})


def wait_for_receipt(api: httpx.Client, key: str) -> dict[str, Any]:
    def finished() -> dict[str, Any]:
        response = api.get(f"/receipts/{key}")
        body: dict[str, Any] = response.json()
        done = response.status_code == 200 and body["state"] in ("SUCCESS", "FAILURE")
        return body if done else {}
    return wait_for(finished, what=f"the receipt for {key!r}")


def receipts_sent(env: dict[str, str], order_id: int) -> int:
    client = redis.Redis.from_url(env["RECEIPTS_URL"])
    try:
        return int(client.get(f"{env['SHOP_NAMESPACE']}:receipts:{order_id}:email") or 0)
    finally:
        client.close()


def test_retried_requests_get_the_same_task_and_one_receipt(
        api: httpx.Client, shop_env: dict[str, str]) -> None:
    order_id, key = new_order_id(), f'"{uuid.uuid4()}"'
    # Eight copies of one request at once, then three late retries.
    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda _: post_receipt(api, order_id, key), range(8)))
    retries = [post_receipt(api, order_id, key) for _ in range(3)]
    responses = burst + retries
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert len({body["task_id"] for body in bodies}) == 1
    assert sorted(body["duplicate"] for body in bodies) == [False] + [True] * 10
    plain_key = bodies[0]["idempotency_key"]
    assert plain_key == key.strip('"')
    assert {r.headers["location"] for r in responses} == {f"/receipts/{plain_key}"}
    receipt = wait_for_receipt(api, plain_key)
    assert receipt["task_id"] == bodies[0]["task_id"]
    assert receipt["result"] == {"order_id": order_id, "channel": "email", "sent": True,
                                 "receipt_no": 1}
    assert post_receipt(api, order_id, key).json()["task_id"] == bodies[0]["task_id"]
    assert receipts_sent(shop_env, order_id) == 1


def test_retry_while_the_first_is_in_flight_is_202_with_the_same_task(
        api: httpx.Client, shop_env: dict[str, str], shop_worker: Worker) -> None:
    order_id, key = new_order_id(), str(uuid.uuid4())
    with frozen(shop_worker):
        first = post_receipt(api, order_id, key)
        retry = post_receipt(api, order_id, key)
        pending = api.get(f"/receipts/{key}")
        assert receipts_sent(shop_env, order_id) == 0  # nothing ran yet: still in flight
    assert (first.status_code, retry.status_code) == (202, 202), (first.text, retry.text)
    assert retry.json()["task_id"] == first.json()["task_id"]
    assert (first.json()["duplicate"], retry.json()["duplicate"]) == (False, True)
    assert pending.status_code == 200 and pending.json()["state"] == "PENDING", pending.text
    receipt = wait_for_receipt(api, key)
    assert receipt["state"] == "SUCCESS" and receipt["task_id"] == first.json()["task_id"]
    assert receipts_sent(shop_env, order_id) == 1


def test_same_key_for_another_order_is_422(api: httpx.Client,
                                           shop_env: dict[str, str]) -> None:
    order_id, key = new_order_id(), str(uuid.uuid4())
    assert post_receipt(api, order_id, key).status_code == 202
    response = post_receipt(api, order_id + 1, key)
    assert response.status_code == 422, response.text
    assert "different task arguments" in response.json()["detail"]
    wait_for_receipt(api, key)
    assert receipts_sent(shop_env, order_id + 1) == 0


@pytest.mark.parametrize(("headers", "message"), [
    ([], "required"),
    ([("Idempotency-Key", '""')], "empty"),
    ([("Idempotency-Key", '"' + "x" * 300 + '"')], "255"),
    ([("Idempotency-Key", "two words")], "quoted string or a token"),
    ([("Idempotency-Key", '"unbalanced')], "unbalanced quote"),
    ([("Idempotency-Key", '"bad \\n escape"')], "invalid escape"),
    # Two keys in one request: not "the first one wins".
    ([("Idempotency-Key", '"first"'), ("Idempotency-Key", '"second"')], "unescaped quote"),
    ([("Idempotency-Key", "first"), ("Idempotency-Key", "second")], "token"),
    # Bytes that are not ASCII (Starlette decodes header values as Latin-1).
    ([("Idempotency-Key", "café".encode())], "quoted string or a token"),
    ([("Idempotency-Key", '"café"'.encode())], "printable ASCII"),
])
def test_missing_or_malformed_key_is_400_and_enqueues_nothing(
        api: httpx.Client, shop_env: dict[str, str], headers: list[tuple[str, str | bytes]],
        message: str) -> None:
    order_id = new_order_id()
    raw = [(name.encode(), value if isinstance(value, bytes) else value.encode())
           for name, value in headers]
    response = api.post(f"/orders/{order_id}/receipt", headers=raw)
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]
    broker = redis.Redis.from_url(shop_env["BROKER_URL"])
    try:
        assert broker.llen(shop_env["SHOP_NAMESPACE"]) == 0
    finally:
        broker.close()
    assert receipts_sent(shop_env, order_id) == 0


def test_unknown_key_is_404_and_an_invalid_one_400(api: httpx.Client) -> None:
    unknown = api.get(f"/receipts/{uuid.uuid4()}")
    assert unknown.status_code == 404 and "no receipt request" in unknown.json()["detail"]
    invalid = api.get("/receipts/" + "k" * 300)  # from result_for_key, via the handler
    assert invalid.status_code == 400 and "255" in invalid.json()["detail"], invalid.text


def test_the_openapi_schema_documents_the_header(api: httpx.Client) -> None:
    operation = api.get("/openapi.json").json()["paths"]["/orders/{order_id}/receipt"]["post"]
    headers = [p for p in operation["parameters"] if p["in"] == "header"]
    assert [p["name"] for p in headers] == ["Idempotency-Key"]
    assert headers[0]["description"].startswith("Required.")


# ------------------------------------------- a synchronous endpoint: 409 while in flight, 503

sync_app = FastAPI()
install_exception_handlers(sync_app)


@sync_app.post("/charges/{order_id}")
def charge_now(order_id: int, key: IdempotencyKey, wait: float = 0.0) -> dict[str, Any]:
    result = itest.charge.apply_async((order_id,), idempotency_key=key)
    conflict_if_in_flight(result, wait=wait)
    return {"task_id": result.id, "duplicate": result.duplicate,
            "result": result.get(timeout=TIMEOUT)}


@sync_app.get("/optional")
def optional_key(key: OptionalIdempotencyKey) -> dict[str, Any]:
    return {"key": key}


@pytest.fixture(scope="module")
def sync_api() -> Iterator[httpx.Client]:
    """``sync_app`` under uvicorn, in a thread of this process: it publishes with the test app
    (``itest.app``), wherever the test's stack fixture pointed it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sync_app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-sync-app", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
        assert server.started, "uvicorn (sync_app) did not start"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT + 10) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


def test_sync_retry_while_in_flight_is_409_then_the_same_outcome(
        sync_api: httpx.Client, module_stack: Stack, worker: Worker, effects: Effects) -> None:
    order_id, key = new_order_id(), str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    with ThreadPoolExecutor(1) as pool:
        with frozen(worker):
            first = pool.submit(sync_api.post, f"/charges/{order_id}", headers=headers)
            wait_for(lambda: itest.charge.result_for_key(key), what="the first request's key")
            conflict = sync_api.post(f"/charges/{order_id}", headers=headers)
            # Waiting cannot help either: the worker is stopped.
            waited = sync_api.post(f"/charges/{order_id}", headers=headers,
                                   params={"wait": 0.3})
        answered = first.result()
    for response in (conflict, waited):
        assert response.status_code == 409, response.text
        assert "still being processed" in response.json()["detail"]
    assert answered.status_code == 200, answered.text
    assert answered.json()["result"]["run"] == 1 and answered.json()["duplicate"] is False
    again = sync_api.post(f"/charges/{order_id}", headers=headers)
    assert again.status_code == 200, again.text
    assert again.json() == {**answered.json(), "duplicate": True}
    assert effects.count("charge", order_id) == 1


def test_optional_key(sync_api: httpx.Client) -> None:
    assert sync_api.get("/optional").json() == {"key": None}
    assert sync_api.get("/optional", headers={"Idempotency-Key": "k-1"}).json() == {"key": "k-1"}
    malformed = sync_api.get("/optional", headers={"Idempotency-Key": "a b"})
    assert malformed.status_code == 400, malformed.text


def test_store_down_is_503_without_the_store_address(
        sync_api: httpx.Client, outage_stack: Stack, own_redis: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="celery_idempotency.fastapi"):
        response = sync_api.post(f"/charges/{new_order_id()}",
                                 headers={"Idempotency-Key": str(uuid.uuid4())})
    assert response.status_code == 503, response.text
    assert response.json() == {"detail": "the idempotency store is unavailable; retry later"}
    assert str(own_redis.port) not in response.text
    # The on-call engineer's side: the log says which store.
    logged = [r.getMessage() for r in caplog.records if r.name == "celery_idempotency.fastapi"]
    assert len(logged) == 1 and "answered 503" in logged[0], logged
    assert f"127.0.0.1:{own_redis.port}" in logged[0], logged
