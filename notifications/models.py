from django.db import models

from common.idempotency import ProcessedKeyBase


class Notification(models.Model):
    """One message to a customer about one order outcome, on one channel.

    The unique (saga, kind, channel) constraint makes each message exist once; the claim
    (`sending`, `claim_token`, `lease_until`, `claimed_by`) makes one attempt at a time
    deliver it.
    """

    class Kind(models.TextChoices):
        ORDER_CONFIRMED = "order_confirmed"
        ORDER_FAILED = "order_failed"
        ORDER_CANCELLED = "order_cancelled"

    class Channel(models.TextChoices):
        EMAIL = "email"
        SMS = "sms"

    class Status(models.TextChoices):
        PENDING = "pending"
        # Claimed by one attempt (`claim_token`) until `lease_until`: a concurrent copy of
        # the message does not send it; past the lease its owner is presumed dead.
        SENDING = "sending"
        SENT = "sent"

    saga_id = models.UUIDField()
    order_id = models.UUIDField(db_index=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    recipient = models.CharField(max_length=254)
    subject = models.CharField(max_length=200)
    body = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    claim_token = models.UUIDField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)
    # The process that holds the claim (common.liveness): a copy that finds it provably
    # dead takes the claim over before its lease ends.
    claimed_by = models.CharField(max_length=200, blank=True, default="", db_default="")
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["saga_id", "kind", "channel"], name="notification_once_per_outcome"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} by {self.channel} to {self.recipient} ({self.status})"

    @property
    def reference(self) -> str:
        """The message's own name, the same in every copy that delivers it: the email's
        Message-ID and the SMS's reference. A message sent again in one of delivery's
        at-least-once windows (notifications.services) is then recognisably the same one,
        which some mail systems fold into one and an audit can tell from a second message."""
        return message_reference(self.saga_id, self.kind)


def message_reference(saga_id: object, kind: str) -> str:
    """`Notification.reference` of the message of outcome `kind` for saga `saga_id`."""
    return f"{saga_id}.{kind}"


class ProcessedKey(ProcessedKeyBase):
    class Meta:
        db_table = "notifications_processed_key"
