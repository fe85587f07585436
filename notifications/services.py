"""Tell the customer about an order's outcome, once per outcome and channel."""

import contextlib
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.db.models.functions import Now
from django.utils import timezone

from common.exceptions import TransientError
from common.idempotency import processed_record, processed_result, saga_lock, step_key

from . import channels
from .models import Notification, ProcessedKey

DB = "notifications"
NOTIFICATION = f'"{Notification._meta.db_table}"'
SENDING = Notification.Status.SENDING
LEASE_MARGIN_SECONDS = 5

MESSAGES = {
    Notification.Kind.ORDER_CONFIRMED: (
        "Your order {short} is confirmed",
        "Thank you! Your order {order} is confirmed; we charged {amount} {currency}.",
    ),
    Notification.Kind.ORDER_FAILED: (
        "Your order {short} could not be completed",
        "We could not complete your order {order}: {reason}. You have not been charged.",
    ),
    Notification.Kind.ORDER_CANCELLED: (
        "Your order {short} is cancelled",
        "Your order {order} is cancelled as you asked. Any charge has been refunded.",
    ),
}
OUTCOME_KINDS = {
    "confirmed": Notification.Kind.ORDER_CONFIRMED,
    "failed": Notification.Kind.ORDER_FAILED,
    "cancelled": Notification.Kind.ORDER_CANCELLED,
}


def notification_send(
    *,
    saga_id: uuid.UUID,
    order_id: uuid.UUID,
    outcome: str,
    email: str,
    phone: str = "",
    amount: str = "",
    currency: str = "",
    reason: str = "",
) -> dict[str, Any]:
    """Record and deliver the outcome notification on every channel the customer gave.

    Idempotent by `<saga>:notify_<outcome>:do`; the (saga, kind, channel) unique row makes
    each message exist once. Safe with any number of concurrent copies: before delivering,
    this attempt claims the rows in the database (`sending`, its own `claim_token`, a lease
    of the task's hard time limit), and delivers only what it claimed. A copy that finds a
    row under someone else's live claim delivers nothing of it and raises `TransientError`:
    its task retries with backoff and finds the outcome recorded (or the lease expired).

    Delivery happens outside the transaction and is marked sent afterwards, only where this
    attempt still holds the claim. At-least-once for one window only: an owner that dies
    (or stalls past its lease) after the provider accepted the message but before its mark
    commits is taken over once the lease expires, and the message goes out again. SMTP has
    no idempotency key; we chose that over risking a lost message.
    """
    kind = OUTCOME_KINDS[outcome]
    key = step_key(saga_id, f"notify_{outcome}", "do")
    subject, body = MESSAGES[kind]
    fields = {"order": order_id, "short": str(order_id)[:8], "amount": amount, "currency": currency}
    subject, body = subject.format(**fields), body.format(**fields, reason=reason or "it failed")
    recipients = [(Notification.Channel.EMAIL, email)] + ([(Notification.Channel.SMS, phone)] if phone else [])
    result = {"notified": kind, "channels": [channel for channel, _ in recipients]}
    claim, lease = uuid.uuid4(), lease_seconds()

    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        if (done := processed_result(ProcessedKey, key)) is not None:
            return done
        # The saga lock serialises every copy's claim: a plain read, then insert what is
        # missing, already claimed by this attempt (no get_or_create savepoints).
        existing = {n.channel: n for n in Notification.objects.filter(saga_id=saga_id, kind=kind)}
        missing = [
            Notification(
                saga_id=saga_id,
                kind=kind,
                channel=channel,
                order_id=order_id,
                recipient=recipient,
                subject=subject,
                body=body,
                status=Notification.Status.SENDING,
                claim_token=claim,
                lease_until=Now() + timedelta(seconds=lease),
            )
            for channel, recipient in recipients
            if channel not in existing
        ]
        Notification.objects.bulk_create(missing)
        mine = {n.channel for n in missing}
        # Rows left by an earlier copy: the conditional UPDATE claims those nobody holds
        # (pending, or a dead owner's expired lease). Only a redelivery gets here.
        if any(n.status != Notification.Status.SENT for n in existing.values()):
            mine |= _claim(saga_id=saga_id, kind=kind, claim=claim, lease=lease)
        rows = {**existing, **{n.channel: n for n in missing}}
        claimed = [rows[channel] for channel, _ in recipients if channel in mine]
        held = sorted(
            n.channel for n in existing.values() if n.status != Notification.Status.SENT and n.channel not in mine
        )
        if not claimed:
            if held:
                raise TransientError(f"saga {saga_id}: {kind} by {', '.join(held)} is being sent by another copy")
            processed_record(ProcessedKey, key, result)  # sent by earlier copies: the outcome is known
            return result

    try:
        for index, notification in enumerate(claimed):
            if notification.channel == Notification.Channel.EMAIL:
                channels.send_email(to=notification.recipient, subject=notification.subject, body=notification.body)
            else:
                channels.send_sms(to=notification.recipient, body=notification.body)
            if index + 1 < len(claimed):
                _mark_sent(notification.pk, claim)
    except BaseException:
        # This attempt is over (it will be retried): what it did not deliver is free to
        # claim again now rather than when the lease expires.
        with contextlib.suppress(Exception):  # if this fails too, the lease runs out instead
            _release(claimed, claim)
        raise
    # The last delivery is marked sent in the transaction that records the key: one commit
    # fewer per message. A crash before it commits re-sends that one (as documented above).
    with transaction.atomic(using=DB):
        if _mark_sent(claimed[-1].pk, claim) and not held:
            processed_record(ProcessedKey, key, result, if_new=True)
    if held:
        # Delivered ours; another copy holds the rest. Not done until it is: retry.
        raise TransientError(f"saga {saga_id}: {kind} by {', '.join(held)} is being sent by another copy")
    return result


def lease_seconds() -> int:
    """How long a claim keeps other copies off: the task's hard time limit (after which its
    attempt is surely over, killed if need be) plus a margin for the kill to land."""
    return settings.CELERY_TASK_TIME_LIMIT + LEASE_MARGIN_SECONDS


def _claim(*, saga_id: uuid.UUID, kind: str, claim: uuid.UUID, lease: int) -> set[str]:
    """Claim this outcome's rows that nobody holds; the channels claimed. Conditional in one
    statement, so of two concurrent claims exactly one takes each row."""
    with connections[DB].cursor() as cursor:
        cursor.execute(
            f"UPDATE {NOTIFICATION} SET status = %s, claim_token = %s, "
            "lease_until = statement_timestamp() + make_interval(secs => %s) "
            "WHERE saga_id = %s AND kind = %s "
            "AND (status = %s OR (status = %s AND lease_until < statement_timestamp())) RETURNING channel",
            [SENDING, claim, lease, saga_id, kind, Notification.Status.PENDING, SENDING],
        )
        return {channel for (channel,) in cursor.fetchall()}


def _mark_sent(pk: int, claim: uuid.UUID) -> bool:
    """Mark a delivered row sent if this attempt still holds its claim; False if its lease
    expired and another copy took it over (which then records the outcome)."""
    return bool(
        Notification.objects.filter(pk=pk, claim_token=claim, status=Notification.Status.SENDING).update(
            status=Notification.Status.SENT, sent_at=timezone.now()
        )
    )


def _release(claimed: list[Notification], claim: uuid.UUID) -> None:
    Notification.objects.filter(
        pk__in=[n.pk for n in claimed], claim_token=claim, status=Notification.Status.SENDING
    ).update(status=Notification.Status.PENDING, claim_token=None, lease_until=None)
