"""A small HTTP API in front of the shop: the client's ``Idempotency-Key`` header becomes the
task's idempotency key, so a retried request enqueues nothing new and gets the same task id.

    POST /orders/<order_id>/receipt     Idempotency-Key: "<key>"   -> 202 {"task_id": ...}
    GET  /receipts/<key>                                          -> 200 {"state", "result"}

Status codes follow the IETF Idempotency-Key draft: 400 for a missing or malformed key, 422
when the key was used for another order. A retry gets the original response again (202, same
task id) — the first request's work was only to enqueue, and that is done. A synchronous API
that waits for the result would answer 409 while the first request is in flight instead:
`celery_idempotency.http.status_for_submission` does that mapping.

Run it with ``flask --app examples.api run`` next to a worker (``celery -A examples.shop
worker``); Flask is an optional extra (``pip install celery-idempotency[api]``).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from celery_idempotency import IdempotencyError, StoreUnavailable
from celery_idempotency.http import HEADER, parse_idempotency_key, status_for_error
from examples.shop import send_receipt

api = Flask(__name__)


def _error(message: str, status: int) -> ResponseReturnValue:
    return jsonify(error=message), status


@api.post("/orders/<int:order_id>/receipt")
def create_receipt(order_id: int) -> ResponseReturnValue:
    try:
        key = parse_idempotency_key(request.headers.get(HEADER))
        assert key is not None
        result = send_receipt.apply_async((order_id,), idempotency_key=key)
    except StoreUnavailable as exc:
        return _error(str(exc), 503)
    except IdempotencyError as exc:
        return _error(str(exc), status_for_error(exc))
    body = {"task_id": result.id, "idempotency_key": key, "duplicate": result.duplicate}
    return jsonify(body), 202, {"Location": f"/receipts/{key}"}


@api.get("/receipts/<path:key>")
def get_receipt(key: str) -> ResponseReturnValue:
    try:
        handle = send_receipt.result_for_key(key)
    except IdempotencyError as exc:
        return _error(str(exc), 400)
    if handle is None:
        return _error(f"no receipt request with key {key!r}", 404)
    body: dict[str, Any] = {"task_id": handle.id, "state": handle.state}
    if handle.state == "SUCCESS":
        body["result"] = handle.get()
    elif handle.state == "FAILURE":
        body["error"] = str(handle.get(propagate=False))
    return jsonify(body), 200
