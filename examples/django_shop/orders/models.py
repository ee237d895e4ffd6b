from django.db import models


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    stock = models.PositiveIntegerField()


class Order(models.Model):
    # The client's Idempotency-Key: one order per key, whatever the number of retries.
    idempotency_key = models.CharField(max_length=255, unique=True)
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    email = models.EmailField()
    created_at = models.DateTimeField(auto_now_add=True)

    def payload(self) -> dict[str, object]:
        """What the client asked for: a retry with the same key must ask for the same."""
        return {"sku": self.sku, "quantity": self.quantity, "email": self.email}
