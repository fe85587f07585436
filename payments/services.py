"""Payment writes: charge and refund for a saga, idempotently, through the gateway.

No database transaction is held open across a provider call. Instead the payment row
records where we are (`pending` while a charge is in flight, `refunding` while a refund
is), every call carries the step key as the provider's idempotency key, and a
redelivered message resumes from the row's status.
"""

import uuid
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from common.exceptions import StepRefused, TransientError
from common.idempotency import processed_record, processed_result, processed_results, saga_lock, step_key

from .exceptions import PaymentDeclined
from .gateways import CardDeclined, get_gateway
from .models import Payment, ProcessedKey, Refund
from .resilience import call_provider

DB = "payments"
STEP = "charge_payment"


def _declined(result: dict[str, Any]) -> PaymentDeclined:
    return PaymentDeclined(f"payment declined: {result['decline_code']}")


def payment_charge(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, amount: Decimal, currency: str, token: str
) -> dict[str, Any]:
    """Charge `amount` once per saga.

    Idempotent by `<saga>:charge_payment:do` (also the provider's idempotency key);
    refuses after the refund's tombstone. A decline is recorded, then raised as
    `PaymentDeclined` (the saga compensates); a replay raises it again.
    """
    do_key, undo_key = step_key(saga_id, STEP, "do"), step_key(saga_id, STEP, "undo")
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        processed = processed_results(ProcessedKey, do_key, undo_key)
        if (done := processed.get(do_key)) is not None:
            if done["status"] == Payment.Status.DECLINED:
                raise _declined(done)
            return done
        if undo_key in processed:
            raise StepRefused(f"saga {saga_id}: payment was already compensated; not charging")
        # The row is the "charge in flight" marker a concurrent refund waits on. The saga
        # lock serialises this check with any other message of the saga: no savepoint needed.
        now = timezone.now()
        payment = Payment.objects.filter(saga_id=saga_id).first()
        if payment is None:
            payment = Payment.objects.create(
                saga_id=saga_id, order_id=order_id, amount=amount, currency=currency, attempt_started_at=now
            )
        elif payment.status == Payment.Status.VOIDED:
            raise StepRefused(f"saga {saga_id}: payment was voided by its compensation; not charging")
        else:
            Payment.objects.filter(pk=payment.pk).update(attempt_started_at=now)

    try:
        charge = call_provider(
            get_gateway().charge, amount=amount, currency=currency, token=token, idempotency_key=do_key
        )
    except CardDeclined as declined:
        with transaction.atomic(using=DB):
            saga_lock(using=DB, saga_id=saga_id)
            if (done := processed_result(ProcessedKey, do_key)) is not None:
                raise _declined(done) from None  # a concurrent copy of this message recorded it
            Payment.objects.filter(pk=payment.pk).update(status=Payment.Status.DECLINED, decline_code=declined.code)
            result = {"payment_id": str(payment.pk), "status": Payment.Status.DECLINED, "decline_code": declined.code}
            processed_record(ProcessedKey, do_key, result)
        raise _declined(result) from None
    except Exception:
        # This attempt is over (it will be retried, or the saga compensates): a waiting
        # refund may now ask the provider what happened instead of waiting for it.
        Payment.objects.filter(pk=payment.pk, status=Payment.Status.PENDING).update(attempt_started_at=None)
        raise

    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        # Still pending: ours to capture. Otherwise a concurrent copy of this message got
        # the same answer and recorded it, or the compensation voided the attempt.
        captured = Payment.objects.filter(pk=payment.pk, status=Payment.Status.PENDING).update(
            status=Payment.Status.CAPTURED, provider_charge_id=charge.charge_id
        )
        if captured:
            result = {"payment_id": str(payment.pk), "status": Payment.Status.CAPTURED}
            processed_record(ProcessedKey, do_key, result)
            return result
        if (done := processed_result(ProcessedKey, do_key)) is not None:
            return done
    # The compensation gave up on this attempt (voided it) while the provider was still
    # answering: the money moved after all, so give it back now.
    call_provider(get_gateway().refund, charge_id=charge.charge_id, amount=amount, idempotency_key=undo_key)
    Payment.objects.filter(pk=payment.pk).update(status=Payment.Status.REFUNDED, provider_charge_id=charge.charge_id)
    raise StepRefused(f"saga {saga_id}: charge completed after its compensation was voided; refunded at once")


def _charge_attempt_is_over(payment: Payment) -> bool:
    """True once no charge attempt can still be at the provider: the last one ended (it
    cleared `attempt_started_at`), or it started longer ago than the hard task time limit,
    after which Celery has killed it (a SIGKILLed worker cannot clear the marker)."""
    if payment.attempt_started_at is None:
        return True
    return (timezone.now() - payment.attempt_started_at).total_seconds() > settings.CELERY_TASK_TIME_LIMIT + 5


def payment_refund(*, saga_id: uuid.UUID) -> dict[str, Any]:
    """Refund what the saga captured; with no payment, leave a tombstone.

    Idempotent by `<saga>:charge_payment:undo` (also the provider's idempotency key).
    While the charge is still in flight this raises `TransientError`: the compensation
    retries with backoff until the charge has settled, then refunds it.
    """
    undo_key = step_key(saga_id, STEP, "undo")
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        if (done := processed_result(ProcessedKey, undo_key)) is not None:
            return done
        payment = Payment.objects.select_for_update().filter(saga_id=saga_id).first()
        if payment is None or payment.status == Payment.Status.DECLINED:
            result = {"refund": None, "reason": "nothing was captured"}
            processed_record(ProcessedKey, undo_key, result)
            return result
        if payment.status == Payment.Status.PENDING:
            if not _charge_attempt_is_over(payment):
                raise TransientError(f"saga {saga_id}: charge still in flight; refund waits for it to settle")
            # The charge died mid-call (worker killed, provider hung past the time limit).
            # The provider knows whether the money moved: ask it by the charge's key.
            found = call_provider(get_gateway().find_charge, idempotency_key=step_key(saga_id, STEP, "do"))
            if found is None:
                payment.status = Payment.Status.VOIDED
                payment.save(update_fields=["status", "updated_at"])
                result = {"refund": None, "reason": "the charge never completed; voided"}
                processed_record(ProcessedKey, undo_key, result)
                return result
            payment.status, payment.provider_charge_id = Payment.Status.CAPTURED, found.charge_id
        if payment.status == Payment.Status.CAPTURED:
            payment.status = Payment.Status.REFUNDING
            payment.save(update_fields=["status", "provider_charge_id", "updated_at"])

    refund = call_provider(
        get_gateway().refund, charge_id=payment.provider_charge_id, amount=payment.amount, idempotency_key=undo_key
    )
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        Payment.objects.filter(pk=payment.pk).update(status=Payment.Status.REFUNDED)
        Refund.objects.get_or_create(
            payment=payment, defaults={"amount": payment.amount, "provider_refund_id": refund.refund_id}
        )
        result = {"refund": refund.refund_id, "amount": str(payment.amount)}
        # A concurrent copy (a duplicate message that found the payment `refunding`) made the
        # same provider refund under the same key and may have recorded it first.
        processed_record(ProcessedKey, undo_key, result, if_new=True)
    return result
