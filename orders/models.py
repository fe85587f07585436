import uuid

from django.db import models
from django.db.models import Q


class Order(models.Model):
    """An order and its lifecycle: pending -> confirmed | failed | cancelled.

    Changed only by `orders.services`, under `select_for_update` on this row.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        CONFIRMED = "confirmed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # The user lives in the default database: referenced by id, no cross-database key.
    # No index of its own: order_user_created_idx starts with it (common.indexes).
    user_id = models.BigIntegerField()
    email = models.EmailField()
    phone = models.CharField(max_length=20, blank=True)
    payment_token = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    failure_reason = models.TextField(blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="order_idempotency_key_per_user",
            ),
        ]
        indexes = [models.Index(fields=["user_id", "-created_at"], name="order_user_created_idx")]

    def __str__(self) -> str:
        return f"order {self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status != self.Status.PENDING


class OrderLine(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="lines")
    sku = models.CharField(max_length=64)
    name = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.sku} x{self.quantity}"
