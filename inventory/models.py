from django.db import models
from django.db.models import F, Q

from common.idempotency import ProcessedKeyBase


class Product(models.Model):
    """A catalogue entry and its stock.

    `on_hand` is what the warehouse holds; `reserved` what orders in flight hold. When an
    order is confirmed its reservation becomes a sale (`stock_sell`): its units leave both.
    Both change only through conditional single-statement updates in `inventory.services`.
    """

    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    on_hand = models.PositiveIntegerField(default=0)
    reserved = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sku"]
        constraints = [
            # The database, not the code path, guarantees we never oversell.
            models.CheckConstraint(condition=Q(reserved__lte=F("on_hand")), name="product_reserved_lte_on_hand"),
            models.CheckConstraint(condition=Q(price__gte=0), name="product_price_non_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class Reservation(models.Model):
    class Status(models.TextChoices):
        HELD = "held"
        RELEASED = "released"
        # The order was confirmed: the units left stock (never released).
        SOLD = "sold"

    # No index of its own: reservation_one_line_per_sku starts with it (common.indexes).
    saga_id = models.UUIDField()
    order_id = models.UUIDField(db_index=True)
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=10, decimal_places=2)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.HELD)
    created_at = models.DateTimeField(auto_now_add=True)
    released_at = models.DateTimeField(null=True, blank=True)
    sold_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["saga_id", "sku"], name="reservation_one_line_per_sku"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} x{self.quantity} ({self.status})"


class ProcessedKey(ProcessedKeyBase):
    class Meta:
        db_table = "inventory_processed_key"
