"""The audit names what breaks an invariant (the chaos run, tests/test_chaos.py, shows it
clean on a real run). Other tests' committed orders may share these databases, so each
test looks only at the violations that name its own records."""

import io
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction

from audit.invariants import audit
from orders.models import Order
from orders.saga import PLACE_ORDER
from saga.models import SagaStatus
from saga.publish import saga_start

pytestmark = pytest.mark.django_db(databases=["default", "orders", "inventory", "payments", "notifications"])


def order_create(*, status: str) -> Order:
    return Order.objects.using("orders").create(
        user_id=1,
        email="audit@example.com",
        payment_token="tok_visa",
        status=status,
        total=Decimal("10.00"),
        currency="EUR",
    )


def about(order_or_saga_id: uuid.UUID, violations: list[str]) -> list[str]:
    return [v for v in violations if str(order_or_saga_id) in v]


def test_an_order_without_a_saga_and_a_confirmation_without_money_are_named() -> None:
    orphan = order_create(status=Order.Status.PENDING)
    confirmed = order_create(status=Order.Status.CONFIRMED)
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=confirmed.id, context={"items": []})
    saga.status = SagaStatus.COMPLETED
    saga.save(update_fields=["status"])

    violations = audit()

    assert about(orphan.id, violations) == [f"order {orphan.id}: has no saga"]
    assert about(confirmed.id, violations) == [
        f"order {confirmed.id}: confirmed without a payment",
        f"order {confirmed.id}: 0 order_confirmed emails, not 1",
    ]


def test_the_command_exits_non_zero_and_prints_each_violation() -> None:
    orphan = order_create(status=Order.Status.PENDING)
    out = io.StringIO()

    with pytest.raises(CommandError, match=r"violation\(s\)"):
        call_command("saga_audit", "--grace", "0", stdout=out)

    assert f"VIOLATION order {orphan.id}: has no saga\n" in out.getvalue()


def test_a_confirmed_orders_stock_is_sold_once_settled_and_no_other_orders_ever() -> None:
    from django.utils import timezone

    from inventory.models import Product, Reservation

    sku = f"AUDIT-{uuid.uuid4().hex[:8]}"
    Product.objects.create(sku=sku, name="audit", price=Decimal("10.00"), on_hand=7, reserved=1)
    confirmed, failed = order_create(status=Order.Status.CONFIRMED), order_create(status=Order.Status.FAILED)
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=confirmed.id, context={"items": []})
    long_ago = timezone.now() - timedelta(hours=1)
    saga.status, saga.pivot_committed_at = SagaStatus.COMPLETED, long_ago
    saga.save(update_fields=["status", "pivot_committed_at"])

    def reserve(order: Order, status: str, quantity: int) -> None:
        Reservation.objects.create(
            saga_id=uuid.uuid4(), order_id=order.id, sku=sku, quantity=quantity, unit_price="10.00", status=status
        )

    reserve(confirmed, Reservation.Status.HELD, 1)
    reserve(failed, Reservation.Status.SOLD, 2)

    violations = audit(initial_stock={sku: 10})

    assert about(saga.id, violations) == [f"saga {saga.id}: confirmed at {long_ago} but its sale is not settled"]
    assert f"order {failed.id}: is failed but its {sku} was sold" in violations
    assert f"product {sku}: on_hand=7 plus 2 sold is not the 10 it started with" in violations
    # Settled, the confirmed order's reservation must be sold: it still holds.
    saga.settled_at = timezone.now()
    saga.save(update_fields=["settled_at"])
    violations = audit(initial_stock={sku: 10})
    assert about(saga.id, violations) == []
    assert f"order {confirmed.id}: is confirmed and settled but its {sku} is held, not sold" in violations
