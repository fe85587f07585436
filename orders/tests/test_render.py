"""The hand-written order body (orders.api.render) is what the declared serializer renders."""

import uuid
from decimal import Decimal

import pytest
from django.utils import timezone

from orders.api.render import order_body
from orders.api.serializers import OrderOutput
from orders.models import Order, OrderLine
from saga.models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus

pytestmark = pytest.mark.django_db(databases=["orders"])


def _order(**fields: object) -> Order:
    order = Order.objects.create(
        user_id=1, email="you@example.com", payment_token="tok_visa", total=Decimal("19.5"), currency="EUR", **fields
    )
    OrderLine.objects.create(order=order, sku="MUG", name="Mug", quantity=3, unit_price=Decimal("6.5"))
    OrderLine.objects.create(order=order, sku="TEE", name="T-shirt", quantity=1, unit_price=Decimal("0"))
    return Order.objects.prefetch_related("lines").get(id=order.id)


def _saga(order: Order, **fields: object) -> SagaInstance:
    saga = SagaInstance.objects.create(definition="place_order", order_id=order.id, context={}, **fields)
    now = timezone.now()
    SagaStep.objects.create(
        saga=saga,
        phase=StepPhase.FORWARD,
        position=0,
        name="reserve_inventory",
        task_name="inventory.reserve",
        status=StepStatus.SUCCEEDED,
        attempts=2,
        queued_at=now,
        started_at=now,
        finished_at=now,
        celery_task_id=f"{saga.id}-reserve_inventory-g0",
    )
    SagaStep.objects.create(
        saga=saga,
        phase=StepPhase.FORWARD,
        position=1,
        name="charge_payment",
        task_name="payments.charge",
        status=StepStatus.FAILED,
        last_error="PaymentDeclined: payment declined: card_declined",
    )
    SagaStep.objects.create(
        saga=saga, phase=StepPhase.FORWARD, position=2, name="confirm_order", task_name="orders.confirm"
    )
    SagaStep.objects.create(
        saga=saga, phase=StepPhase.COMPENSATION, position=0, name="release_inventory", task_name="inventory.release"
    )
    return SagaInstance.objects.prefetch_related("steps").get(id=saga.id)


@pytest.mark.parametrize(
    "order_fields, saga_fields",
    [
        ({}, {}),
        ({}, None),
        (
            {"status": Order.Status.FAILED, "failure_reason": "payment declined", "phone": "+14155550123"},
            {
                "status": SagaStatus.COMPENSATED,
                "failure_step": "charge_payment",
                "failure_type": "PaymentDeclined",
                "finished_at": timezone.now(),
            },
        ),
        ({"cancel_requested_at": timezone.now()}, {"failure_type": "SomethingInternal", "current_step": "x"}),
        ({}, {"status": SagaStatus.NEEDS_ATTENTION, "failure_step": "charge_payment"}),
        ({}, {"status": SagaStatus.COMPENSATING, "failure_step": "charge_payment"}),
    ],
)
def test_the_body_is_what_the_serializer_renders(order_fields: dict, saga_fields: dict | None) -> None:
    order = _order(**order_fields)
    saga = None if saga_fields is None else _saga(order, **saga_fields)
    declared = OrderOutput(order, context={"sagas": {order.id: saga} if saga else {}}).data
    assert order_body(order, saga) == declared
    assert list(order_body(order, saga)) == list(declared)  # same keys, same order


def test_an_unknown_order_id_gets_no_saga() -> None:
    order = _order()
    assert order_body(order, None)["saga"] is None
    assert order_body(order, None)["id"] == str(order.id) != str(uuid.uuid4())


@pytest.mark.parametrize(
    "saga_status, confirm, release",
    [
        (SagaStatus.RUNNING, "pending", "pending"),
        # The chain stopped at the charge: the confirm will not run, the release is next.
        (SagaStatus.COMPENSATING, "not_run", "pending"),
        (SagaStatus.COMPENSATED, "not_run", "pending"),
        # Stopped for an operator: nothing pending runs unless they retry.
        (SagaStatus.NEEDS_ATTENTION, "not_run", "not_run"),
    ],
)
def test_a_pending_step_that_will_not_run_is_shown_as_not_run(saga_status: str, confirm: str, release: str) -> None:
    order = _order()
    saga = _saga(order, status=saga_status, failure_step="charge_payment")
    for body in (order_body(order, saga), OrderOutput(order, context={"sagas": {order.id: saga}}).data):
        shown = {step["name"]: step["status"] for step in body["saga"]["steps"]}
        assert shown == {
            "reserve_inventory": "succeeded",
            "charge_payment": "failed",
            "confirm_order": confirm,
            "release_inventory": release,
        }
