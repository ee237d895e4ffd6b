"""``POST /orders`` with an ``Idempotency-Key`` header and a JSON body
``{"sku": ..., "quantity": ..., "email": ...}``: creates the order, takes it from stock and
e-mails the receipt (a Celery task published when the transaction commits).

- a retry with the same key and body: the same order (200), no second receipt;
- the same key with another body: 422; a missing or malformed key: 400;
- not enough stock: 409, and the transaction rolls back: no order, and no receipt task
  (``apply_async_on_commit`` publishes only on commit);
- the idempotency store unreachable when the order is written: 503, nothing written.
"""

import json

from django.db import transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from celery_idempotency import IdempotencyKeyMismatch, InvalidIdempotencyKey, StoreUnavailable
from celery_idempotency.http import HEADER, parse_idempotency_key, status_for_error

from .models import Order, Product
from .tasks import send_receipt


class OutOfStock(Exception):
    pass


@csrf_exempt
@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    try:
        key = parse_idempotency_key(request.headers.get(HEADER))
        payload = _payload(request.body)
        with transaction.atomic():
            order, created = _order_for(key, payload)
            # Checked now (key, arguments, the key used with other arguments), published when
            # the transaction commits; if it rolls back, nothing is reserved or sent.
            pending = send_receipt.apply_async_on_commit((order.pk,), idempotency_key=key)
            if created:
                # After the publish on purpose: this can still fail and roll everything back.
                _take_from_stock(order)
    except (InvalidIdempotencyKey, IdempotencyKeyMismatch) as exc:  # 400, 422
        return JsonResponse({"error": str(exc)}, status=status_for_error(exc))
    except ValueError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    except OutOfStock as exc:
        return JsonResponse({"error": str(exc)}, status=409)
    except StoreUnavailable:
        response = JsonResponse({"error": "try again later"}, status=503)
        response["Retry-After"] = "5"
        return response
    # Committed: the receipt task was published (or, for a retry, found already published).
    return JsonResponse({"order_id": order.pk, "idempotency_key": key, "created": created,
                         "task_id": pending.result.id,
                         "duplicate": bool(getattr(pending.result, "duplicate", False))},
                        status=201 if created else 200)


def _payload(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
        payload = {"sku": str(data["sku"]), "quantity": int(data["quantity"]),
                   "email": str(data["email"])}
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError("body must be JSON with sku, quantity and email") from exc
    if payload["quantity"] < 1:
        raise ValueError("quantity must be at least 1")
    return payload


def _order_for(key: str, payload: dict[str, object]) -> tuple[Order, bool]:
    """The key's order, created if new. The same key with another body is a client error,
    reported as celery_idempotency reports a task's key reused with other arguments."""
    order = Order.objects.select_for_update().filter(idempotency_key=key).first()
    if order is None:
        return Order.objects.create(idempotency_key=key, **payload), True
    if order.payload() != payload:
        raise IdempotencyKeyMismatch(
            "Idempotency-Key reused with a different request body; use a new key for a new "
            "order", key=key)
    return order, False


def _take_from_stock(order: Order) -> None:
    taken = Product.objects.filter(sku=order.sku, stock__gte=order.quantity).update(
        stock=F("stock") - order.quantity)
    if not taken:
        raise OutOfStock(f"not enough {order.sku!r} in stock for {order.quantity}")
