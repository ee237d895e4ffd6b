"""The HTTP API of examples/api.py, in FastAPI: the client's ``Idempotency-Key`` header becomes
the task's idempotency key, so a retried request enqueues nothing new and gets the same task id.

    POST /orders/{order_id}/receipt     Idempotency-Key: "<key>"   -> 202 {"task_id": ...}
    GET  /receipts/{key}                                          -> 200 {"state", "result"}

The same status codes as the Flask example: 400 for a missing or malformed key, 422 when the
key was used for another order, 503 when the idempotency store is down (nothing was enqueued),
and 202 with the same task id for a retry, also while the first request's task is still queued
or running. Errors are FastAPI's ``{"detail": "..."}``.

Run it with ``uvicorn examples.fastapi_app:app`` next to a worker (``celery -A examples.shop
worker``); FastAPI is an optional extra (``pip install 'celery-idempotency[fastapi]'``, and
uvicorn to serve it).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Response

from celery_idempotency.fastapi import IdempotencyKey, install_exception_handlers
from examples.shop import send_receipt

app = FastAPI(title="shop receipts")
install_exception_handlers(app)


# ``def``, not ``async def``: publishing talks to Redis synchronously, so FastAPI runs these in
# its thread pool instead of blocking the event loop.
@app.post("/orders/{order_id}/receipt", status_code=202)
def create_receipt(order_id: int, key: IdempotencyKey, response: Response) -> dict[str, Any]:
    result = send_receipt.apply_async((order_id,), idempotency_key=key)
    response.headers["Location"] = f"/receipts/{quote(key, safe='')}"
    return {"task_id": result.id, "idempotency_key": key, "duplicate": result.duplicate}


@app.get("/receipts/{key:path}")
def get_receipt(key: str) -> dict[str, Any]:
    handle = send_receipt.result_for_key(key)  # an invalid key: 400 (the installed handler)
    if handle is None:
        raise HTTPException(404, detail=f"no receipt request with key {key!r}")
    body: dict[str, Any] = {"task_id": handle.id, "state": handle.state}
    if handle.state == "SUCCESS":
        body["result"] = handle.get()
    elif handle.state == "FAILURE":
        body["error"] = str(handle.get(propagate=False))
    return body
