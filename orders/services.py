"""Order writes: place (and start its saga), cancel, and the saga's confirm/fail steps."""

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from common.db import insert_together
from common.exceptions import StepRefused
from common.sql import is_step_abort, prepared
from inventory.selectors import product_prices
from saga.definition import get_definition
from saga.models import SagaAuditEntry, SagaInstance, SagaStatus
from saga.operator import saga_compensate
from saga.progress import pivot_record_ctes, saga_pivot_commit
from saga.publish import OUTCOME_CANCELLED, OUTCOME_FAILED, saga_begin_compensation, saga_new, saga_publish

from .exceptions import IdempotencyConflict, OrderNotCancellable, OrderTotalTooLarge, UnknownSkus
from .models import Order, OrderLine
from .saga import PLACE_ORDER

DB = "orders"
# The largest total an order's column holds (Order.total: 12 digits, 2 of them decimals).
_TOTAL = Order._meta.get_field("total")
MAX_TOTAL = Decimal(10) ** (_TOTAL.max_digits - _TOTAL.decimal_places) - Decimal(1).scaleb(-_TOTAL.decimal_places)


@dataclass(frozen=True)
class OrderItem:
    sku: str
    quantity: int


def request_fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of a request body, to tell a replay from a different request."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _existing_for_key(user_id: int, idempotency_key: str, fingerprint: str) -> Order | None:
    order = Order.objects.filter(user_id=user_id, idempotency_key=idempotency_key).first()
    if order is not None and order.request_fingerprint != fingerprint:
        raise IdempotencyConflict(f"Idempotency-Key {idempotency_key!r} was used with a different request")
    return order


def order_place(
    *,
    user_id: int,
    email: str,
    phone: str,
    items: Sequence[OrderItem],
    payment_token: str,
    idempotency_key: str | None,
    fingerprint: str,
) -> tuple[Order, bool]:
    """Create a pending order and its saga in one `orders` statement; publish once written.

    Returns (order, created); a created order carries its lines and, as `placed_saga`, its
    saga with its steps, as written. With an `idempotency_key` already used by this user for the
    same request, returns that order and starts nothing; for a different request raises
    `IdempotencyConflict`. Raises `UnknownSkus` or `OrderTotalTooLarge` before writing anything.
    """
    # A replay is found by the unique (user, key) constraint when the insert below fails,
    # not by a lookup first: a new key, the common case, costs no query (BENCHMARKS.md).
    catalogue = product_prices(skus=[item.sku for item in items])
    unknown = [item.sku for item in items if item.sku not in catalogue]
    refusal: Exception | None = UnknownSkus(unknown) if unknown else None
    if refusal is None:
        total = sum((catalogue[i.sku].price * i.quantity for i in items), Decimal("0"))
        if total > MAX_TOTAL:
            # A catalogue price times the largest quantity can outgrow the total's column:
            # a 400 before anything is written, not the database's error (a 500).
            refusal = OrderTotalTooLarge(total, MAX_TOTAL)
    if refusal is not None:
        # A replay of an order placed before its product left the catalogue, or before its
        # prices rose, answers with that order.
        if idempotency_key and (existing := _existing_for_key(user_id, idempotency_key, fingerprint)):
            return existing, False
        raise refusal
    order = Order(
        user_id=user_id,
        email=email,
        phone=phone,
        payment_token=payment_token,
        total=total,
        currency=settings.CURRENCY,
        idempotency_key=idempotency_key or None,
        request_fingerprint=fingerprint,
    )
    lines = [
        OrderLine(
            order=order, sku=i.sku, name=catalogue[i.sku].name, quantity=i.quantity, unit_price=catalogue[i.sku].price
        )
        for i in items
    ]
    saga = saga_new(
        # The newest registered version: a new order starts on what this deployment runs.
        definition=get_definition(PLACE_ORDER.name),
        order_id=order.id,
        context={
            "email": email,
            "phone": phone,
            # The quote: the reserve step holds stock only at these prices and the charge
            # takes this total, so the customer pays what they were shown.
            "items": [{"sku": i.sku, "quantity": i.quantity, "unit_price": str(catalogue[i.sku].price)} for i in items],
            "total": str(total),
            "payment_token": payment_token,
            "currency": settings.CURRENCY,
        },
    )
    try:
        # The order, its lines, its saga and its steps in one statement, which commits on
        # its own: one round trip where the ORM took six (BENCHMARKS.md).
        insert_together(DB, [order], lines, [saga], saga._prefetched_objects_cache["steps"])  # type: ignore[attr-defined]  # Django's prefetch cache
    except IntegrityError:
        # The key was used before (a replay), or two requests with it raced: the order
        # that committed stands.
        if idempotency_key and (existing := _existing_for_key(user_id, idempotency_key, fingerprint)):
            return existing, False
        raise
    saga_publish(saga)
    # What the response shows, as written: the caller need not read it back (four queries).
    order._prefetched_objects_cache = {"lines": lines}  # type: ignore[attr-defined]  # Django's prefetch cache
    order.placed_saga = saga  # type: ignore[attr-defined]  # read by the view that placed it
    return order, True


def order_cancel(*, order_id: uuid.UUID) -> Order:
    """Ask for an order to be cancelled: its saga compensates whatever was done.

    Locks the order, then its saga (the same order `order_confirm` takes), so a cancel
    and the confirmation cannot both win. Idempotent: cancelling twice is one cancel.
    Raises `OrderNotCancellable` once the order is confirmed or has failed.
    """
    with transaction.atomic(using=DB):
        order = Order.objects.select_for_update().get(id=order_id)
        if order.status == Order.Status.CANCELLED or order.cancel_requested_at:
            return order
        if order.status != Order.Status.PENDING:
            raise OrderNotCancellable(f"order is {order.status}")
        saga = SagaInstance.objects.select_for_update().get(order_id=order.id)
        if saga.status != SagaStatus.RUNNING:
            if saga.outcome:
                raise OrderNotCancellable("order is already being failed")
            if saga.status == SagaStatus.NEEDS_ATTENTION:
                # Stopped at or after its pivot for an operator: not the customer's to undo.
                raise OrderNotCancellable("order can no longer be cancelled: our staff are completing it")
            raise OrderNotCancellable(f"order can no longer be cancelled (its saga is {saga.status})")
        order.cancel_requested_at = timezone.now()
        order.save(update_fields=["cancel_requested_at", "updated_at"])
        saga_begin_compensation(
            saga,
            outcome=OUTCOME_CANCELLED,
            failure_step=saga.current_step,
            failure_type="Cancelled",
            reason="cancelled by the customer",
        )
    return order


def order_stop_by_operator(*, order_id: uuid.UUID, user: Any) -> SagaAuditEntry:
    """Someone other than the customer cancels an order (staff, through the API): exactly
    the admin's "compensate now" (`saga_compensate`), audited as such, refusals included.

    The order ends failed ("stopped by our staff") and the customer is told; only the
    customer's own cancel ends it cancelled "as you asked". The caller has checked the
    permission (saga.compensate_saga). Raises `SagaInstance.DoesNotExist` for an order
    without a saga.
    """
    saga_id = SagaInstance.objects.using(DB).filter(order_id=order_id).values_list("id", flat=True).first()
    if saga_id is None:
        raise SagaInstance.DoesNotExist(f"order {order_id} has no saga")
    return saga_compensate(saga_id=saga_id, user=user)


CONFIRMED = {"outcome": "confirmed"}


def order_confirm(*, order_id: uuid.UUID, saga_id: uuid.UUID, total: Decimal, timeline: Any = None) -> dict[str, Any]:
    """The saga's pivot: the order becomes confirmed, after which nothing is compensated.

    Idempotent by the order's state (confirmed stays confirmed). Refuses if a cancel was
    requested, the saga is no longer running, or `total` (what the saga charged: the quoted
    total from its context) is not the order's total; the order's total is never rewritten.
    `timeline` is the chain's record of the steps before the pivot (common.steps), which
    the saga store takes in this transaction.
    """
    if _confirm_at_once(order_id=order_id, saga_id=saga_id, total=total, timeline=timeline):
        return dict(CONFIRMED)
    table = f'"{Order._meta.db_table}"'
    with transaction.atomic(using=DB), prepared(DB) as cursor:
        # The order's row lock first, as `orders.saga.order_lock_for_compensation` takes it, then the
        # saga's (saga_pivot_commit). Plain SQL, prepared: this runs once per order (BENCHMARKS.md).
        cursor.execute(f"SELECT status, total, cancel_requested_at FROM {table} WHERE id = %s FOR UPDATE", [order_id])
        row = cursor.fetchone()
        if row is None:
            raise StepRefused(f"order {order_id} does not exist")
        status, order_total, cancel_requested_at = row
        if status == Order.Status.CONFIRMED:
            return dict(CONFIRMED)
        if order_total != total:
            # Compensating refunds the charge: the customer pays the order's total or nothing.
            raise StepRefused(f"order {order_id}: the saga charged {total}, the order's total is {order_total}")
        # Why, in the words the timeline's last error shows an operator.
        if status != Order.Status.PENDING:
            raise StepRefused(f"order {order_id} can no longer be confirmed (order {status})")
        if cancel_requested_at:
            raise StepRefused(f"order {order_id} can no longer be confirmed (the customer asked to cancel it)")
        if not saga_pivot_commit(saga_id=saga_id, order_id=order_id, timeline=timeline, output=CONFIRMED):
            raise StepRefused(f"order {order_id} can no longer be confirmed (its saga is no longer running)")
        cursor.execute(
            f"UPDATE {table} SET status = %s, updated_at = now() WHERE id = %s", [Order.Status.CONFIRMED, order_id]
        )
    return dict(CONFIRMED)


def _confirm_at_once(*, order_id: uuid.UUID, saga_id: uuid.UUID, total: Decimal, timeline: Any) -> bool:
    """The usual confirm (a pending order of `total`, no cancel asked, its saga at the
    pivot with the chain's record of every step before it) in one statement: the order's
    row lock, then the saga's, the pivot's record (saga.progress.pivot_record_ctes) and
    the order confirmed, committed in the same round trip. False if it wrote nothing: any
    other case (a redelivered confirm, a cancel, another total, a saga past its pivot or
    compensating, a step changed while the statement waited for the saga's row, which
    makes it undo itself) takes `order_confirm`'s general way, which says what is the case.

    Precondition: no transaction open on "orders" (the statement commits on its own).
    """
    table = f'"{Order._meta.db_table}"'
    record = pivot_record_ctes(
        definition=get_definition(PLACE_ORDER.name),
        saga_id=saga_id,
        order_id=order_id,
        timeline=timeline,
        output=CONFIRMED,
        now=timezone.now(),
        guard="pending",
    )
    if record is None:
        return False
    try:
        with prepared(DB) as cursor:
            cursor.execute(
                f"WITH pending AS MATERIALIZED (SELECT id FROM {table} WHERE id = %s AND status = %s AND total = %s "
                f"AND cancel_requested_at IS NULL FOR UPDATE), {record.ctes}, "
                f"confirmed AS (UPDATE {table} AS o SET status = %s, updated_at = now() FROM pivoted "
                "WHERE o.id = %s AND o.status = %s RETURNING o.id) "
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pivoted) THEN false "
                f"WHEN {record.written} AND (SELECT count(*) FROM confirmed) = 1 THEN true "
                "ELSE saga_step_abort('a step changed while the pivot waited for its saga') END",
                [
                    *(order_id, Order.Status.PENDING, total),
                    *record.params,
                    *(Order.Status.CONFIRMED, order_id, Order.Status.PENDING),
                    *record.written_params,
                ],
            )
            return bool(cursor.fetchone()[0])
    except DatabaseError as error:
        if is_step_abort(error):
            return False  # nothing written: the statement undid itself
        raise


def order_fail(*, order_id: uuid.UUID, saga_id: uuid.UUID, reason: str) -> dict[str, Any]:
    """After compensation: the order ends cancelled (if the customer asked) or failed.

    Idempotent by the order's state. Refuses unless the order's saga is compensating (or
    has compensated): a message of the saga's forward phase sent here fails nothing.

    The first copy fails a pending order in one statement, one round trip: its row lock
    is the one `order_confirm` and a cancel take, and PostgreSQL checks the order still
    pending on the row it waited for, so a confirm that committed first leaves it alone.
    Anything else (a copy that comes second, a confirmed order, a saga that is not
    compensating) goes the general way below, which says what is the case.
    """
    order_table, saga_table = f'"{Order._meta.db_table}"', f'"{SagaInstance._meta.db_table}"'
    with prepared(DB) as cursor:
        cursor.execute(
            f"UPDATE {order_table} AS o SET status = CASE WHEN o.cancel_requested_at IS NULL THEN %s ELSE %s END, "
            "failure_reason = %s, updated_at = now() WHERE o.id = %s AND o.status = %s "
            f"AND EXISTS (SELECT 1 FROM {saga_table} AS s WHERE s.id = %s AND s.order_id = o.id AND s.outcome <> '') "
            "RETURNING o.status",
            [
                Order.Status.FAILED,
                Order.Status.CANCELLED,
                reason[:2000],
                order_id,
                Order.Status.PENDING,
                saga_id,
            ],
        )
        failed = cursor.fetchone()
    if failed is not None:
        return {"outcome": OUTCOME_CANCELLED if failed[0] == Order.Status.CANCELLED else OUTCOME_FAILED}
    with transaction.atomic(using=DB):
        order = Order.objects.select_for_update().filter(id=order_id).first()
        if order is None:
            raise StepRefused(f"order {order_id} does not exist")
        if not SagaInstance.objects.filter(id=saga_id, order_id=order_id).exclude(outcome="").exists():
            raise StepRefused(f"order {order_id}: saga {saga_id} is not compensating; not failing the order")
        if order.status == Order.Status.CONFIRMED:
            raise StepRefused(f"order {order_id} is confirmed; it cannot fail")
        if order.status == Order.Status.PENDING:
            order.status = Order.Status.CANCELLED if order.cancel_requested_at else Order.Status.FAILED
            order.failure_reason = reason[:2000]
            order.save(update_fields=["status", "failure_reason", "updated_at"])
    outcome = OUTCOME_CANCELLED if order.status == Order.Status.CANCELLED else OUTCOME_FAILED
    return {"outcome": outcome}
