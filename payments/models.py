import uuid

from django.db import models

from common.idempotency import ProcessedKeyBase


class Payment(models.Model):
    """The payment of one saga. At most one per saga (the charge's idempotency guard).

    pending -> captured -> refunding -> refunded, or pending -> declined, or
    pending -> voided (the charge attempt died and the provider has no charge for it).
    `pending` means a charge is in flight at the provider since `attempt_started_at`.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        CAPTURED = "captured"
        DECLINED = "declined"
        REFUNDING = "refunding"
        REFUNDED = "refunded"
        VOIDED = "voided"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    saga_id = models.UUIDField(unique=True)
    order_id = models.UUIDField(db_index=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    decline_code = models.CharField(max_length=64, blank=True)
    provider_charge_id = models.CharField(max_length=64, blank=True)
    attempt_started_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} ({self.status})"


class Refund(models.Model):
    payment = models.OneToOneField(Payment, on_delete=models.PROTECT, related_name="refund")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    provider_refund_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"refund {self.amount} of {self.payment_id}"


class ProcessedKey(ProcessedKeyBase):
    class Meta:
        db_table = "payments_processed_key"


class FakeProviderOperation(models.Model):
    """The fake provider's own ledger: what it would keep on its side of the wire."""

    idempotency_key = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    outcome = models.CharField(max_length=16)
    code = models.CharField(max_length=64, blank=True)
    reference = models.CharField(max_length=64, unique=True)
    token = models.CharField(max_length=64, blank=True)
    charge_reference = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.reference} ({self.outcome})"


class FakeProviderAttempt(models.Model):
    """How often the fake provider was asked to charge with a key (for tok_transient)."""

    idempotency_key = models.CharField(max_length=200, unique=True)
    attempts = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.idempotency_key}: {self.attempts}"
