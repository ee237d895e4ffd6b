from celery import shared_task
from django.core.mail import send_mail

from celery_idempotency.django import IdempotentDjangoTask

from .models import Order


@shared_task(base=IdempotentDjangoTask, name="orders.send_receipt")
def send_receipt(order_id: int) -> dict[str, object]:
    """E-mail the receipt: once per order, however often it is published or delivered."""
    order = Order.objects.get(pk=order_id)
    send_mail(
        subject=f"Receipt for order {order.pk}",
        message=(f"order: {order.pk}\nreference: {order.idempotency_key}\n"
                 f"{order.quantity} x {order.sku}\n"),
        from_email=None,
        recipient_list=[order.email],
    )
    return {"order_id": order.pk, "sent_to": order.email}
