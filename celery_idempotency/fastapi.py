"""FastAPI integration: the ``Idempotency-Key`` header as a dependency, and the IETF draft's
status codes as exception handlers. An optional extra: ``pip install
'celery-idempotency[fastapi]'``.

    from celery_idempotency.fastapi import IdempotencyKey, install_exception_handlers

    app = FastAPI()
    install_exception_handlers(app)        # 422 for a reused key, 400, 503

    @app.post("/orders/{order_id}/receipt", status_code=202)
    def create_receipt(order_id: int, key: IdempotencyKey) -> dict[str, str]:
        return {"task_id": send_receipt.apply_async((order_id,), idempotency_key=key).id}

The header is parsed by `celery_idempotency.http.parse_idempotency_key` (the rules live there
only); a missing (``IdempotencyKey``) or malformed key is answered 400 before the endpoint
runs. Error bodies are FastAPI's ``{"detail": "..."}``.

Publishing (``apply_async``) and `conflict_if_in_flight` talk to Redis synchronously: use them
from ``def`` endpoints, which FastAPI runs in its thread pool, not from ``async def`` ones.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, overload

try:
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.responses import JSONResponse, Response
except ModuleNotFoundError as missing:  # pragma: no cover - shown by tests/packaging
    raise ImportError(
        f"celery_idempotency.fastapi needs FastAPI ({missing}); install the extra: "
        "pip install 'celery-idempotency[fastapi]'", name=missing.name) from missing

from .exceptions import (
    IdempotencyError,
    IdempotencyKeyMismatch,
    InvalidIdempotencyKey,
    StoreUnavailable,
)
from .http import CONFLICT, HEADER, parse_idempotency_key, status_for_error, status_for_submission

__all__ = [
    "IdempotencyKey",
    "OptionalIdempotencyKey",
    "conflict_if_in_flight",
    "idempotency_key_header",
    "install_exception_handlers",
]

logger = logging.getLogger(__name__)

UNAVAILABLE = 503

_DESCRIPTION = (
    "The client's key for this request (IETF Idempotency-Key draft): a quoted string "
    '("...") or a bare token, at most 255 characters. A retry with the same key and payload '
    "gets the original response; the same key with another payload is answered 422.")


@overload
def idempotency_key_header(
        *, required: Literal[True] = ...) -> Callable[..., Awaitable[str]]: ...
@overload
def idempotency_key_header(*, required: bool) -> Callable[..., Awaitable[str | None]]: ...


def idempotency_key_header(*, required: bool = True) -> Callable[..., Awaitable[str | None]]:
    """A dependency giving the request's idempotency key: ``Depends(idempotency_key_header())``.

    A missing header (when ``required``), an empty, too long or malformed one is answered 400
    (an ``HTTPException``, so no handler needs installing). Not required and absent: None.
    """
    what = "Required" if required else "Optional"

    async def idempotency_key(
        request: Request,
        # Declared for the OpenAPI schema only; the value is read from every field line below.
        # Not a required parameter even when the key is: FastAPI would answer its own 422,
        # where the draft says 400.
        _header: Annotated[str | None, Header(alias=HEADER,
                                              description=f"{what}. {_DESCRIPTION}")] = None,
    ) -> str | None:
        # Repeated field lines are combined as RFC 9110 (5.3) says: two keys in one request
        # make no valid Structured Field string, so they are a 400, never "the first wins".
        lines = request.headers.getlist(HEADER)
        try:
            return parse_idempotency_key(", ".join(lines) if lines else None,
                                         required=required)
        except InvalidIdempotencyKey as error:
            raise HTTPException(status_for_error(error), detail=str(error)) from error

    return idempotency_key


#: An endpoint parameter holding the request's idempotency key; missing or malformed: 400.
IdempotencyKey = Annotated[str, Depends(idempotency_key_header(required=True))]
#: The same, but None when the request has no ``Idempotency-Key`` header (malformed: 400).
OptionalIdempotencyKey = Annotated[
    str | None, Depends(idempotency_key_header(required=False))]


async def _client_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, IdempotencyError)
    return JSONResponse({"detail": str(error)}, status_code=status_for_error(error))


async def _store_unavailable(request: Request, error: Exception) -> Response:
    # The message names the store (host, port); the client only needs to know to come back.
    # Nothing was published: a retry with the same key is safe.
    logger.warning("%s %s: answered 503: %s", request.method, request.url.path, error)
    return JSONResponse({"detail": "the idempotency store is unavailable; retry later"},
                        status_code=UNAVAILABLE)


def install_exception_handlers(app: FastAPI) -> None:
    """Answer what ``apply_async`` raises with the draft's status codes: the same key with
    other arguments (`IdempotencyKeyMismatch`) 422, an invalid key (`InvalidIdempotencyKey`,
    e.g. from ``result_for_key``) 400, and `StoreUnavailable` 503. Other errors of the
    library stay server errors (500)."""
    app.add_exception_handler(IdempotencyKeyMismatch, _client_error)
    app.add_exception_handler(InvalidIdempotencyKey, _client_error)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)


def conflict_if_in_flight(result: Any, *, wait: float = 0.0) -> None:
    """For a synchronous endpoint (one that answers with the task's outcome): raise a 409
    ``HTTPException`` when ``result`` (from ``apply_async``) is a retry whose first request is
    still in flight, after waiting up to ``wait`` seconds for its outcome. A new submission, or
    a retry whose first request has finished, returns (then ``result.get()`` is the outcome).
    """
    if status_for_submission(result, wait=wait) == CONFLICT:
        raise HTTPException(CONFLICT, detail=(
            "a request with this Idempotency-Key is still being processed; retry later "
            f"(key={result.idempotency_key!r}, task_id={result.id!r})"))
