"""Tell the customer about an order's outcome, once per outcome and channel."""

import contextlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models.functions import Now
from django.utils import timezone

from common.exceptions import TransientError
from common.idempotency import processed_record, processed_result, saga_lock, step_key
from common.liveness import process_gone, process_identity
from common.sql import prepared

from . import channels
from .models import Notification, ProcessedKey

DB = "notifications"
NOTIFICATION, PROCESSED_KEY = (f'"{m._meta.db_table}"' for m in (Notification, ProcessedKey))
SENDING, PENDING = Notification.Status.SENDING, Notification.Status.PENDING
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
    A claim also names the process that holds it (common.liveness): a copy that finds that
    process provably dead (on this host: a worker SIGKILLed mid-send) takes the claim over
    at once instead of waiting out the lease.

    Delivery happens outside the transaction and is marked sent afterwards, only where this
    attempt still holds the claim. At-least-once in two windows: an owner that dies (or
    stalls past its lease) after the provider accepted the message but before its mark
    commits is taken over once the lease expires; and an error raised after the server
    accepted it (a reply to QUIT that is an error, the soft time limit landing between the
    server's 250 and the return) looks like a failed send, so the claim is let go and the
    retry sends again. SMTP has no idempotency key; we chose that over risking a lost
    message.
    """
    kind = OUTCOME_KINDS[outcome]
    key = step_key(saga_id, f"notify_{outcome}", "do")
    subject, body = MESSAGES[kind]
    fields = {"order": order_id, "short": str(order_id)[:8], "amount": amount, "currency": currency}
    subject, body = subject.format(**fields), body.format(**fields, reason=reason or "it failed")
    recipients = [(Notification.Channel.EMAIL, email)] + ([(Notification.Channel.SMS, phone)] if phone else [])
    result = {"notified": kind, "channels": [channel for channel, _ in recipients]}
    claim, lease = uuid.uuid4(), lease_seconds()

    message = _Message(saga_id, order_id, kind, key, subject, body, recipients, claim)
    claimed = _claim_new(message, lease=lease)
    held: list[str] = []
    if isinstance(claimed, dict):
        return claimed  # recorded by an earlier copy
    if claimed is None:
        # Rows an earlier copy left (a redelivery, a racing copy): the general path.
        again = _claim_existing(message, result=result, lease=lease)
        if isinstance(again, dict):
            return again
        claimed, held = again
        if not claimed:
            raise TransientError(f"saga {saga_id}: {kind} by {', '.join(held)} is being sent by another copy")

    delivered: list[Notification] = []
    try:
        for index, notification in enumerate(claimed):
            if notification.channel == Notification.Channel.EMAIL:
                channels.send_email(
                    to=notification.recipient,
                    subject=notification.subject,
                    body=notification.body,
                    reference=notification.reference,
                )
            else:
                channels.send_sms(to=notification.recipient, body=notification.body, reference=notification.reference)
            delivered.append(notification)
            if index + 1 < len(claimed):
                _mark_sent(notification.pk, claim)
    except BaseException:
        # This attempt is over (it will be retried). What it delivered is marked sent once
        # more (its mark may be what failed): released, the retry would send it again.
        # What it did not deliver is free to claim again now rather than when the lease
        # expires. If these fail too, the lease runs out instead.
        with contextlib.suppress(Exception):
            for notification in delivered:
                _mark_sent(notification.pk, claim)
        with contextlib.suppress(Exception):
            _release([n for n in claimed if n not in delivered], claim)
        raise
    # The last delivery is marked sent in the statement that records the key. A crash
    # before it commits re-sends that one (as documented above).
    _finish(claimed[-1].pk, claim, key=key, result=result, record=not held)
    if held:
        # Delivered ours; another copy holds the rest. Not done until it is: retry.
        raise TransientError(f"saga {saga_id}: {kind} by {', '.join(held)} is being sent by another copy")
    return result


@dataclass(frozen=True)
class _Message:
    """One outcome's notification, as this attempt would claim it."""

    saga_id: uuid.UUID
    order_id: uuid.UUID
    kind: str
    key: str
    subject: str
    body: str
    recipients: list[tuple[Any, str]]  # (channel, recipient)
    claim: uuid.UUID

    def row(self, channel: str, recipient: str, **fields: Any) -> Notification:
        """Its row on `channel`, claimed by this attempt."""
        return Notification(
            saga_id=self.saga_id,
            kind=self.kind,
            channel=channel,
            order_id=self.order_id,
            recipient=recipient,
            subject=self.subject,
            body=self.body,
            status=SENDING,
            claim_token=self.claim,
            claimed_by=process_identity(),
            **fields,
        )


def _claim_new(message: _Message, *, lease: int) -> dict[str, Any] | list[Notification] | None:
    """The first copy's claim, in one statement and no transaction of its own: the stored
    result if the outcome was already recorded; else this outcome's rows, inserted already
    claimed by this attempt; or None if some of them exist already (an earlier or racing
    copy made them: `_claim_existing` decides under the saga lock).

    A racing copy's insert of the same row waits on the unique (saga, kind, channel) index
    until this statement commits, then inserts nothing: exactly one copy claims a new row.
    """
    m = message
    with prepared(DB) as cursor:
        cursor.execute(
            f"WITH done AS (SELECT result FROM {PROCESSED_KEY} WHERE key = %s), "
            f"new AS (INSERT INTO {NOTIFICATION} (saga_id, kind, channel, order_id, recipient, subject, body, "
            "status, claim_token, claimed_by, lease_until, created_at) "
            "SELECT %s, %s, c.channel, %s, c.recipient, %s, %s, %s, %s, %s, "
            "statement_timestamp() + make_interval(secs => %s), statement_timestamp() "
            "FROM unnest(%s::varchar[], %s::varchar[]) AS c(channel, recipient) "
            "WHERE NOT EXISTS (SELECT 1 FROM done) "
            "ON CONFLICT (saga_id, kind, channel) DO NOTHING RETURNING id, channel) "
            "SELECT (SELECT result FROM done), (SELECT json_object_agg(channel, id) FROM new)",
            [
                *(m.key, m.saga_id, m.kind, m.order_id, m.subject, m.body, SENDING, m.claim, process_identity()),
                lease,
                [channel for channel, _ in m.recipients],
                [recipient for _, recipient in m.recipients],
            ],
        )
        done, ids = cursor.fetchone()
    if done is not None:
        return done if isinstance(done, dict) else json.loads(done)
    ids = (ids if isinstance(ids, dict) else json.loads(ids)) if ids else {}
    if len(ids) < len(m.recipients):
        return None
    return [m.row(channel, recipient, pk=ids[channel]) for channel, recipient in m.recipients]


def _claim_existing(
    message: _Message, *, result: dict[str, Any], lease: int
) -> dict[str, Any] | tuple[list[Notification], list[str]]:
    """Claim what nobody holds of an outcome whose rows an earlier copy made, under the
    saga lock; the stored result if the outcome is recorded, else (rows this attempt
    claimed, channels another copy holds)."""
    saga_id, kind, key = message.saga_id, message.kind, message.key
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        # The rows before the key. A copy's last mark records the key in its own statement,
        # without the saga lock (`_finish`), and each statement here sees what committed
        # before it began: rows read as all sent have their key in the read after, while
        # a key read first could miss a finish that the rows then show.
        existing = {n.channel: n for n in Notification.objects.filter(saga_id=saga_id, kind=kind)}
        if (done := processed_result(ProcessedKey, key)) is not None:
            return done
        missing = [
            message.row(channel, recipient, lease_until=Now() + timedelta(seconds=lease))
            for channel, recipient in message.recipients
            if channel not in existing
        ]
        try:
            Notification.objects.bulk_create(missing)
        except IntegrityError:
            # A first copy's claim (`_claim_new`, which takes no saga lock) made them just now.
            raise TransientError(f"saga {saga_id}: {kind} is being sent by another copy") from None
        mine = {n.channel for n in missing}
        # Rows left by an earlier copy: the conditional UPDATE claims those nobody holds
        # (pending, a dead owner's expired lease, or a live lease whose owner is provably
        # gone: a worker killed mid-send, whose message came back to this one).
        if any(n.status != Notification.Status.SENT for n in existing.values()):
            gone = [
                n.claim_token
                for n in existing.values()
                if n.status == SENDING and n.claim_token and n.claimed_by and process_gone(n.claimed_by)
            ]
            mine |= _claim(saga_id=saga_id, kind=kind, claim=message.claim, lease=lease, gone=gone)
        rows = {**existing, **{n.channel: n for n in missing}}
        claimed = [rows[channel] for channel, _ in message.recipients if channel in mine]
        held = sorted(
            n.channel for n in existing.values() if n.status != Notification.Status.SENT and n.channel not in mine
        )
        if not claimed and not held:
            # Sent by earlier copies: the outcome is known. `if_new`: `_finish` records it
            # without the saga lock.
            processed_record(ProcessedKey, key, result, if_new=True)
            return result
    return claimed, held


def _finish(pk: int, claim: uuid.UUID, *, key: str, result: dict[str, Any], record: bool) -> None:
    """Mark a delivered row sent if this attempt still holds its claim and, with `record`,
    record the outcome's key in the same statement (not if the claim was lost: the copy
    that took it over records it)."""
    with prepared(DB) as cursor:
        cursor.execute(
            f"WITH sent AS (UPDATE {NOTIFICATION} SET status = %s, sent_at = statement_timestamp() "
            "WHERE id = %s AND claim_token = %s AND status = %s RETURNING id) "
            f"INSERT INTO {PROCESSED_KEY} (key, result, created_at) "
            "SELECT %s, %s::jsonb, statement_timestamp() FROM sent WHERE %s ON CONFLICT (key) DO NOTHING",
            [Notification.Status.SENT, pk, claim, SENDING, key, json.dumps(result), record],
        )


def lease_seconds() -> int:
    """How long a claim keeps other copies off: the task's hard time limit (after which its
    attempt is surely over, killed if need be) plus a margin for the kill to land."""
    return settings.CELERY_TASK_TIME_LIMIT + LEASE_MARGIN_SECONDS


def _claim(
    *, saga_id: uuid.UUID, kind: str, claim: uuid.UUID, lease: int, gone: list[uuid.UUID] | None = None
) -> set[str]:
    """Claim this outcome's rows that nobody holds, or that the claims `gone` (their owners
    provably dead) still hold; the channels claimed. Conditional in one statement, on the
    very claim token seen, so of two concurrent claims exactly one takes each row."""
    with connections[DB].cursor() as cursor:
        cursor.execute(
            f"UPDATE {NOTIFICATION} SET status = %s, claim_token = %s, claimed_by = %s, "
            "lease_until = statement_timestamp() + make_interval(secs => %s) "
            "WHERE saga_id = %s AND kind = %s AND (status = %s OR (status = %s "
            "AND (lease_until < statement_timestamp() OR claim_token = ANY(%s::uuid[])))) RETURNING channel",
            [SENDING, claim, process_identity(), lease, saga_id, kind, PENDING, SENDING, gone or []],
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
    ).update(status=Notification.Status.PENDING, claim_token=None, lease_until=None, claimed_by="")
