"""Payment writes: charge and refund for a saga, idempotently, through the gateway.

No database transaction is held open across a provider call. Instead the payment row
records where the saga's money is (`pending` until the charge settles, `refunding` while
a refund is due), each call to charge is a `PaymentAttempt` of its own, recorded before
the call and finished only by the copy of the message that made it, and every call
carries the step key as the provider's idempotency key. So any number of copies of a
charge or a refund may run at once (a redelivery, a retry, a sweeper re-publish):

- the provider's idempotency key makes the money move at most once per key;
- a refund never declares "nothing was charged" while an attempt may still be at the
  provider; once none is in flight it settles with the provider by the charge's key
  (`void_charge`: the charge if it happened, else the key is refused from then on),
  before it records its tombstone. A charge still on its way then fails, uncharged.
"""

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from common.exceptions import StepRefused, TransientError
from common.idempotency import processed_record, processed_result, processed_results, saga_lock, step_key
from common.liveness import process_gone, process_identity
from common.sql import prepared

from .exceptions import PaymentDeclined
from .gateways import CardDeclined, ChargeVoided, ProviderError, get_gateway
from .models import Payment, PaymentAttempt, ProcessedKey, Refund
from .resilience import CircuitOpen, call_provider

logger = logging.getLogger(__name__)

DB = "payments"
STEP = "charge_payment"
PAYMENT, ATTEMPT, PROCESSED_KEY = (f'"{m._meta.db_table}"' for m in (Payment, PaymentAttempt, ProcessedKey))
Outcome = PaymentAttempt.Outcome


def _declined(result: dict[str, Any]) -> PaymentDeclined:
    return PaymentDeclined(f"payment declined: {result['decline_code']}")


def attempt_lease() -> timedelta:
    """How long a charge attempt may be at the provider: Celery kills the call at the hard
    time limit, and a killed worker cannot record that its call is over."""
    return timedelta(seconds=settings.CELERY_TASK_TIME_LIMIT + 5)


def payment_charge(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, amount: Decimal, currency: str, token: str, task_id: str = ""
) -> dict[str, Any]:
    """Charge `amount` once per saga.

    Idempotent by `<saga>:charge_payment:do` (also the provider's idempotency key);
    refuses after the refund's tombstone, or once the refund has settled the payment. A
    decline is recorded under the key, then raised as `PaymentDeclined` (the saga
    compensates); every later copy raises it again, and is never charged: the provider's
    decline is final for the key (payments.gateways.base). So the saga runs no refund
    after a decline (orders.saga, `final_failures`). Safe with concurrent copies: each
    records its own attempt.

    The first copy's bookkeeping is one statement before the provider call and one after
    (`_begin_first`, `_settle_first`), with no saga lock: each takes the row or key it
    decides on, so a racing copy or the refund waits for it there. Anything else (a later
    copy, a refund in between) is decided under the saga lock.
    """
    do_key = step_key(saga_id, STEP, "do")
    attempt_id = uuid.uuid4()
    attempt = _Attempt(saga_id, order_id, amount, currency, attempt_id, task_id)
    payment_id = _begin_first(attempt)
    resume = None
    if payment_id is None:
        again = _begin_again(attempt)
        if isinstance(again, dict):
            return again  # charged by an earlier copy
        payment_id, resume = again
    if resume is not None:
        # A refund is due (its call failed, or it is under way in a racing copy): any copy
        # may finish it, under the refund's own provider key.
        _refund_at_provider(resume)
        raise StepRefused(f"saga {saga_id}: its compensation is refunding the charge; not charging")

    try:
        charge = call_provider(
            get_gateway().charge, amount=amount, currency=currency, token=token, idempotency_key=do_key
        )
    except CardDeclined as declined:
        if not _settle_first(
            attempt_id,
            payment_id,
            Outcome.DECLINED,
            declined.code,
            do_key=do_key,
            result=(
                result := {
                    "payment_id": str(payment_id),
                    "status": Payment.Status.DECLINED,
                    "decline_code": declined.code,
                }
            ),
        ):
            with transaction.atomic(using=DB):
                saga_lock(using=DB, saga_id=saga_id)
                if (done := processed_result(ProcessedKey, do_key)) is not None:
                    raise _declined(done) from None  # a concurrent copy of this message recorded it
                raise StepRefused(f"saga {saga_id}: its compensation settled the payment first") from None
        raise _declined(result) from None
    except ChargeVoided as voided:
        _attempt_finish(attempt_id, Outcome.VOIDED, str(voided))
        raise StepRefused(f"saga {saga_id}: its compensation voided the charge first; nothing was charged") from None
    except BaseException as error:
        # Only this attempt is over, and only if the provider cannot still complete it: a
        # racing copy's attempt stays in flight, and so does a call that timed out.
        if isinstance(error, CircuitOpen):
            outcome = Outcome.NOT_SENT
        elif isinstance(error, ProviderError):
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.UNKNOWN
        _attempt_finish(attempt_id, outcome, f"{type(error).__name__}: {error}")
        raise

    result = {"payment_id": str(payment_id), "status": Payment.Status.CAPTURED}
    if _settle_first(attempt_id, payment_id, Outcome.SUCCEEDED, charge.charge_id, do_key=do_key, result=result):
        return result
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        # Not pending: a concurrent copy of this message got the same answer and recorded
        # it, or the refund settled the payment meanwhile.
        if (done := processed_result(ProcessedKey, do_key)) is not None:
            return done
        payment = Payment.objects.get(pk=payment_id)
        if payment.status != Payment.Status.VOIDED:
            # The refund's `void_charge` found this very charge: it refunds it.
            raise StepRefused(f"saga {saga_id}: its compensation settled the charge ({payment.status}); refunding")
        # The refund voided the key at the provider, yet the provider charged it: an adapter
        # whose `void_charge` broke its contract. Record the money and give it back.
        logger.error("saga %s: charge %s completed after it was voided; refunding it", saga_id, charge.charge_id)
        payment.status, payment.provider_charge_id = Payment.Status.REFUNDING, charge.charge_id
        payment.save(update_fields=["status", "provider_charge_id", "updated_at"])
    _refund_at_provider(payment)
    raise StepRefused(f"saga {saga_id}: charge completed after its compensation voided it; refunded")


def _begin_first(attempt: "_Attempt") -> uuid.UUID | None:
    """The first copy's payment and attempt, in one statement with no saga lock; None if
    this is not the first copy (or the refund came first): `_begin_again` decides then.

    The guard is the `begun` key: the first insert of it wins, a racing copy's insert
    waits on its unique index and then finds it taken, and `payment_refund` inserts it
    first thing too, so a refund and this statement wait for each other the same way.
    """
    now, saga_id = timezone.now(), attempt.saga_id
    keys = [step_key(saga_id, STEP, direction) for direction in ("do", "undo")]
    with prepared(DB) as cursor:
        cursor.execute(
            f"WITH guard AS (INSERT INTO {PROCESSED_KEY} (key, result, created_at) "
            f"SELECT %s, '{{}}'::jsonb, %s WHERE NOT EXISTS (SELECT 1 FROM {PROCESSED_KEY} WHERE key = ANY(%s)) "
            "ON CONFLICT (key) DO NOTHING RETURNING 1), "
            f"p AS ({NEW_PAYMENT} WHERE EXISTS (SELECT 1 FROM guard) ON CONFLICT (saga_id) DO NOTHING RETURNING id) "
            f"{NEW_ATTEMPT}",
            [
                begun_key(saga_id),
                now,
                keys,
                *attempt.payment_params(now),
                *attempt.attempt_params(now),
            ],
        )
        row = cursor.fetchone()
    return None if row is None else row[0]


def _begin_again(attempt: "_Attempt") -> dict[str, Any] | tuple[uuid.UUID, Payment | None]:
    """A later copy's attempt, decided under the saga lock: (its payment, None), or (the
    payment, itself) when a refund is due that this copy must finish, or the recorded
    result of a charge already made. Raises the recorded outcome of a decline, or
    `StepRefused` once the refund has settled the payment."""
    saga_id = attempt.saga_id
    do_key, undo_key = step_key(saga_id, STEP, "do"), step_key(saga_id, STEP, "undo")
    now = timezone.now()
    with transaction.atomic(using=DB), connections[DB].cursor() as cursor:
        saga_lock(using=DB, saga_id=saga_id)
        # The payment before the keys. The first copy settles without the saga lock, its
        # payment's status and its key in one statement (`_settle_first`), and each
        # statement here sees what committed before it began: a payment read as settled
        # has its key in the read after, while keys read first could miss a settle that
        # the payment then shows, which read as the refund's doing.
        cursor.execute(f"SELECT id, status FROM {PAYMENT} WHERE saga_id = %s", [saga_id])
        row = cursor.fetchone()
        processed = processed_results(ProcessedKey, do_key, undo_key)
        if (done := processed.get(do_key)) is not None:
            if done["status"] == Payment.Status.DECLINED:
                raise _declined(done)
            return done
        if row is not None and row[1] == Payment.Status.REFUNDING:
            resume = Payment.objects.get(pk=row[0])
        elif undo_key in processed:
            raise StepRefused(f"saga {saga_id}: payment was already compensated; not charging")
        elif row is not None and row[1] != Payment.Status.PENDING:
            raise StepRefused(f"saga {saga_id}: payment is {row[1]}, settled by its compensation; not charging")
        else:
            resume = None
            # The payment (if new) and this attempt in one statement. The saga lock
            # serialises every later copy and the refund; a first copy's settle landing
            # after the reads above is found by this copy's own (`_settle_first` False).
            if row is None:
                cursor.execute(
                    f"WITH p AS ({NEW_PAYMENT} RETURNING id) {NEW_ATTEMPT}",
                    [*attempt.payment_params(now), *attempt.attempt_params(now)],
                )
            else:
                params = [row[0], *attempt.attempt_params(now)]
                cursor.execute(f"WITH p AS (SELECT %s::uuid AS id) {NEW_ATTEMPT}", params)
            payment_id = cursor.fetchone()[0]
    return payment_id, resume


# A new payment, pending (a SELECT, so a caller can add WHERE and ON CONFLICT), and this
# attempt at charging it, of the payment the CTE `p` names.
NEW_PAYMENT = (
    f"INSERT INTO {PAYMENT} (id, saga_id, order_id, amount, currency, status, decline_code, provider_charge_id, "
    "created_at, updated_at) SELECT %s, %s, %s, %s, %s, %s, '', '', %s, %s"
)
NEW_ATTEMPT = (
    f"INSERT INTO {ATTEMPT} (id, payment_id, task_id, started_at, lease_until, attempted_by, outcome, error) "
    "SELECT %s, p.id, %s, %s, %s, %s, '', '' FROM p RETURNING payment_id"
)


@dataclass(frozen=True)
class _Attempt:
    """One copy's attempt at a saga's charge."""

    saga_id: uuid.UUID
    order_id: uuid.UUID
    amount: Decimal
    currency: str
    attempt_id: uuid.UUID
    task_id: str

    def payment_params(self, now: datetime) -> list[Any]:
        """NEW_PAYMENT's parameters."""
        return [uuid.uuid4(), self.saga_id, self.order_id, self.amount, self.currency, Payment.Status.PENDING, now, now]

    def attempt_params(self, now: datetime) -> list[Any]:
        """NEW_ATTEMPT's parameters."""
        return [self.attempt_id, self.task_id[:255], now, now + attempt_lease(), process_identity()]


def begun_key(saga_id: uuid.UUID | str) -> str:
    """The key a charge's first copy and a refund both insert first (`_begin_first`)."""
    return f"{saga_id}:{STEP}:begun"


def _settle_first(
    attempt_id: uuid.UUID, payment_id: uuid.UUID, outcome: str, detail: str, *, do_key: str, result: dict[str, Any]
) -> bool:
    """Record this attempt's outcome and, if the payment is still pending, settle it
    (captured, or declined) with its key, in one statement. False if the payment was no
    longer pending (a copy or the refund settled it): the caller finds out which under
    the saga lock. One statement, so a refund (which locks the payment row) sees the
    attempt in flight and the payment pending, or both settled."""
    status = Payment.Status.CAPTURED if outcome == Outcome.SUCCEEDED else Payment.Status.DECLINED
    with prepared(DB) as cursor:
        cursor.execute(
            f"WITH a AS (UPDATE {ATTEMPT} SET outcome = %s, error = %s, finished_at = now() WHERE id = %s), "
            f"s AS (UPDATE {PAYMENT} SET status = %s, provider_charge_id = %s, decline_code = %s, updated_at = now() "
            "WHERE id = %s AND status = %s RETURNING id), "
            f"k AS (INSERT INTO {PROCESSED_KEY} (key, result, created_at) SELECT %s, %s::jsonb, now() FROM s "
            "ON CONFLICT (key) DO NOTHING) "
            "SELECT count(*) FROM s",
            [
                outcome,
                detail[:255],
                attempt_id,
                status,
                detail if status == Payment.Status.CAPTURED else "",
                "" if status == Payment.Status.CAPTURED else detail,
                payment_id,
                Payment.Status.PENDING,
                do_key,
                json.dumps(result),
            ],
        )
        return bool(cursor.fetchone()[0])


def _attempt_finish(attempt_id: uuid.UUID, outcome: str, detail: str = "") -> None:
    """Record how this copy's own attempt ended (its row only: never another copy's)."""
    PaymentAttempt.objects.filter(pk=attempt_id).update(outcome=outcome, error=detail[:255], finished_at=timezone.now())


def charge_attempt_in_flight(payment_id: uuid.UUID) -> bool:
    """True while a charge attempt of this payment may still be at the provider: it has no
    settled outcome, its lease has not run out and the process that made it is not provably
    gone (common.liveness: a worker SIGKILLed mid-call, whose attempt the refund would
    otherwise wait out for the whole lease)."""
    owners = PaymentAttempt.objects.filter(
        payment_id=payment_id, outcome__in=["", Outcome.UNKNOWN], lease_until__gt=timezone.now()
    ).values_list("attempted_by", flat=True)
    return any(not (owner and process_gone(owner)) for owner in owners)


def payment_refund(*, saga_id: uuid.UUID) -> dict[str, Any]:
    """Refund what the saga charged; with nothing charged, leave a tombstone.

    Idempotent by `<saga>:charge_payment:undo` (also the provider's idempotency key of the
    refund). While a charge attempt may still be at the provider this raises
    `TransientError` (the compensation retries with backoff); then it settles the charge
    with the provider by its key (`void_charge`) before it records anything: the charge is
    refunded, or the provider refuses it from then on. Safe with concurrent copies: the
    provider refunds once per key and the result is recorded once.
    """
    undo_key = step_key(saga_id, STEP, "undo")
    settled = False
    late: Payment | None = None
    while True:
        with transaction.atomic(using=DB):
            saga_lock(using=DB, saga_id=saga_id)
            if (done := processed_result(ProcessedKey, undo_key)) is not None:
                # A charge the provider completed after its key was voided (an adapter
                # whose `void_charge` broke its contract) is refunding after the tombstone:
                # every copy of the refund finishes it, not only the charge's own retries.
                late = Payment.objects.filter(saga_id=saga_id, status=Payment.Status.REFUNDING).first()
                if late is None:
                    return done
                break
            # First, the key a charge's first copy inserts without the saga lock: one that
            # is committing now is waited for, and its payment is read below; one that
            # comes later finds the key taken and decides under the saga lock.
            processed_record(ProcessedKey, begun_key(saga_id), {"refund": "first"}, if_new=True)
            payment = Payment.objects.select_for_update().filter(saga_id=saga_id).first()
            if payment is None or payment.status in (Payment.Status.DECLINED, Payment.Status.VOIDED):
                result = {"refund": None, "reason": "nothing was charged"}
                processed_record(ProcessedKey, undo_key, result)
                return result
            if payment.status == Payment.Status.PENDING:
                if settled:
                    raise TransientError(f"saga {saga_id}: the charge did not settle; retrying")
                if charge_attempt_in_flight(payment.pk):
                    raise TransientError(f"saga {saga_id}: a charge is in flight; the refund waits for it to settle")
            elif payment.status == Payment.Status.CAPTURED:
                payment.status = Payment.Status.REFUNDING
                payment.save(update_fields=["status", "updated_at"])
        if payment.status != Payment.Status.PENDING:
            return _refund_at_provider(payment)
        # No attempt in flight, no outcome recorded (the last one died or timed out): the
        # provider decides, once and for all.
        found = call_provider(get_gateway().void_charge, idempotency_key=step_key(saga_id, STEP, "do"))
        settled = True
        with transaction.atomic(using=DB):
            saga_lock(using=DB, saga_id=saga_id)
            if found is None:
                voided = Payment.objects.filter(pk=payment.pk, status=Payment.Status.PENDING).update(
                    status=Payment.Status.VOIDED, updated_at=timezone.now()
                )
                if voided:
                    result = {"refund": None, "reason": "the charge never completed; voided at the provider"}
                    processed_record(ProcessedKey, undo_key, result, if_new=True)
                    return result
            else:
                Payment.objects.filter(pk=payment.pk, status=Payment.Status.PENDING).update(
                    status=Payment.Status.REFUNDING, provider_charge_id=found.charge_id, updated_at=timezone.now()
                )
        # Settled by us or, meanwhile, by a racing copy: the next round reads which.
    assert late is not None  # the loop's one way out that does not return
    return _refund_at_provider(late)


def _refund_at_provider(payment: Payment) -> dict[str, Any]:
    """Refund a `refunding` payment and record it. Any copy may do it: the provider
    refunds once per key, and the record is written once, over a tombstone that said
    nothing was charged (a charge completed after its void) but over no refund."""
    undo_key = step_key(payment.saga_id, STEP, "undo")
    refund = call_provider(
        get_gateway().refund, charge_id=payment.provider_charge_id, amount=payment.amount, idempotency_key=undo_key
    )
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=payment.saga_id)
        Payment.objects.filter(pk=payment.pk).update(status=Payment.Status.REFUNDED, updated_at=timezone.now())
        Refund.objects.get_or_create(
            payment=payment, defaults={"amount": payment.amount, "provider_refund_id": refund.refund_id}
        )
        result = {"refund": refund.refund_id, "amount": str(payment.amount)}
        with connections[DB].cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {PROCESSED_KEY} AS k (key, result, created_at) VALUES (%s, %s::jsonb, now()) "
                "ON CONFLICT (key) DO UPDATE SET result = EXCLUDED.result WHERE k.result->>'refund' IS NULL",
                [undo_key, json.dumps(result)],
            )
    return result
