import uuid

from django.db import models

from common.idempotency import ProcessedKeyBase


class Payment(models.Model):
    """The payment of one saga. At most one per saga (the charge's idempotency guard).

    pending -> captured -> refunding -> refunded, or pending -> declined, or
    pending -> voided (the compensation settled with the provider: no charge under the
    charge's key, and none can happen any more). While `pending`, each call to the
    provider is a `PaymentAttempt` of its own.
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
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} ({self.status})"


class PaymentAttempt(models.Model):
    """One call to the provider to charge a payment, recorded before the call.

    Only the copy of the message that made the call writes its outcome (by this row's id):
    a racing copy never clears or overwrites another's attempt. An attempt is *in flight*
    until it has a settled outcome, or its lease (the task's hard time limit, past which
    Celery has killed the call) has run out, or the process that made it is provably gone
    (`attempted_by`: a worker SIGKILLed mid-call). `unknown` (a timeout, a dropped connection)
    is not settled: the provider may still complete that call until the lease runs out.
    """

    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded"
        DECLINED = "declined"
        # The provider answered with an error: it moved no money.
        FAILED = "failed"
        # Refused before the call (circuit open): the provider never saw it.
        NOT_SENT = "not_sent"
        # The provider refused the key: the compensation voided it first.
        VOIDED = "voided"
        UNKNOWN = "unknown"

    SETTLED = (Outcome.SUCCEEDED, Outcome.DECLINED, Outcome.FAILED, Outcome.NOT_SENT, Outcome.VOIDED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    payment = models.ForeignKey(Payment, on_delete=models.CASCADE, related_name="attempts")
    # The Celery task that made the call (which copy of the message).
    task_id = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField()
    lease_until = models.DateTimeField()
    # The process that made the call (common.liveness): once it is provably gone, its call
    # is over from our side, as at the end of its lease.
    attempted_by = models.CharField(max_length=200, blank=True, default="", db_default="")
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, blank=True)
    error = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ["started_at"]
        indexes = [
            # "Is an attempt of this payment in flight?": the refund's question.
            models.Index(
                fields=["payment", "lease_until"],
                name="payment_attempt_open_idx",
                condition=models.Q(outcome__in=["", "unknown"]),
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.started_at:%H:%M:%S} ({self.outcome or 'in flight'})"


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
