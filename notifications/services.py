"""Tell the customer about an order's outcome, once per outcome and channel."""

import uuid
from typing import Any

from django.db import transaction
from django.utils import timezone

from common.idempotency import processed_record, processed_result, saga_lock, step_key

from . import channels
from .models import Notification, ProcessedKey

DB = "notifications"

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
    each message exist once. Delivery happens outside the transaction and is marked sent
    afterwards: a crash between the two re-sends on redelivery (at-least-once delivery
    for that window; the record stays single).
    """
    kind = OUTCOME_KINDS[outcome]
    key = step_key(saga_id, f"notify_{outcome}", "do")
    subject, body = MESSAGES[kind]
    fields = {"order": order_id, "short": str(order_id)[:8], "amount": amount, "currency": currency}
    subject, body = subject.format(**fields), body.format(**fields, reason=reason or "it failed")
    recipients = [(Notification.Channel.EMAIL, email)] + ([(Notification.Channel.SMS, phone)] if phone else [])

    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        if (done := processed_result(ProcessedKey, key)) is not None:
            return done
        # The saga lock serialises every copy of this message: a plain read, then insert
        # what is missing (no get_or_create savepoints).
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
            )
            for channel, recipient in recipients
            if channel not in existing
        ]
        Notification.objects.bulk_create(missing)
        rows = {**existing, **{n.channel: n for n in missing}}
        pending = [rows[channel] for channel, _ in recipients if rows[channel].status == Notification.Status.PENDING]

    result = {"notified": kind, "channels": [channel for channel, _ in recipients]}
    for index, notification in enumerate(pending):
        if notification.channel == Notification.Channel.EMAIL:
            channels.send_email(to=notification.recipient, subject=notification.subject, body=notification.body)
        else:
            channels.send_sms(to=notification.recipient, body=notification.body)
        if index + 1 < len(pending):
            _mark_sent(notification.pk)
    # The last delivery is marked sent in the transaction that records the key: one commit
    # fewer per message. A crash before it commits re-sends that one (as documented above).
    with transaction.atomic(using=DB):
        if pending:
            _mark_sent(pending[-1].pk)
        processed_record(ProcessedKey, key, result, if_new=True)
    return result


def _mark_sent(pk: int) -> None:
    Notification.objects.filter(pk=pk).update(status=Notification.Status.SENT, sent_at=timezone.now())
