"""The audit names what breaks an invariant (the chaos run, tests/test_chaos.py, shows it
clean on a real run). Other tests' committed orders may share these databases, so each
test looks only at the violations that name its own records."""

import io
import uuid
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
