"""The admin's saga actions act on what their confirmation showed, and their pages ask for
the view permission too. In this process, no workers: nothing the tests write commits."""

from decimal import Decimal

import pytest
from django.db import transaction

from orders.models import Order
from orders.saga import PLACE_ORDER
from saga.models import SagaInstance, SagaStatus, SagaStep, StepStatus
from saga.publish import saga_start

from .coordinator import staff_client

pytestmark = [
    pytest.mark.django_db(databases="__all__"),
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

CHANGELIST = "/admin/saga/sagainstance/"


def placed() -> SagaInstance:
    order = Order.objects.create(
        user_id=1, email="ops@example.com", payment_token="tok_slow", total=Decimal("5.00"), currency="EUR"
    )
    with transaction.atomic(using="orders"):
        return saga_start(definition=PLACE_ORDER, order_id=order.id, context={"items": []})


def test_select_all_compensate_stops_the_sagas_it_showed_not_those_begun_since() -> None:
    shown = placed()
    client = staff_client("view_sagainstance", "compensate_saga")
    url = f"{CHANGELIST}?status__exact=running"
    confirmation = client.post(
        url, {"action": "compensate_sagas", "select_across": "1", "_selected_action": [str(shown.id)], "index": "0"}
    )
    assert confirmation.status_code == 200 and confirmation.context["total"] == 1
    later = placed()  # a customer's order, placed while the operator reads the page

    form: dict[str, list[str]] = {}
    for name, value in confirmation.context["hidden"]:
        form.setdefault(name, []).append(str(value))
    answer = client.post(url, {**form, "post": "yes"})

    assert answer.status_code == 302
    assert SagaInstance.objects.get(id=shown.id).status == SagaStatus.COMPENSATING
    assert SagaInstance.objects.get(id=later.id).status == SagaStatus.RUNNING


@pytest.mark.parametrize("operation", ["retry", "compensate"])
def test_a_sagas_operation_page_needs_the_view_permission_too(operation: str) -> None:
    saga = placed()
    acting_blind = staff_client(f"{operation}_saga")
    assert acting_blind.get(f"{CHANGELIST}{saga.id}/{operation}/").status_code == 403
    seeing = staff_client(f"{operation}_saga", "view_sagainstance")
    assert seeing.get(f"{CHANGELIST}{saga.id}/{operation}/").status_code == 200


def needing_attention(saga: SagaInstance, failure_type: str, step: str) -> None:
    SagaStep.objects.filter(saga=saga, name=step).update(status=StepStatus.FAILED)
    SagaInstance.objects.filter(id=saga.id).update(
        status=SagaStatus.NEEDS_ATTENTION, failure_step=step, failure_type=failure_type
    )


def test_retry_same_failure_retries_the_failures_its_confirmation_showed() -> None:
    chosen, alike, other = placed(), placed(), placed()
    needing_attention(chosen, "GatewayUnavailable", "charge_payment")
    needing_attention(alike, "GatewayUnavailable", "charge_payment")
    needing_attention(other, "StepTimedOut", "confirm_order")
    client = staff_client("view_sagainstance", "retry_saga")
    form = {"action": "retry_same_failure", "_selected_action": [str(chosen.id)], "index": "0"}
    confirmation = client.post(CHANGELIST, form)
    assert confirmation.context["fingerprints"] == ["GatewayUnavailable @ charge_payment"]
    # Meanwhile the chosen saga was retried and failed another way: the failure of `other`.
    SagaInstance.objects.filter(id=chosen.id).update(failure_step="confirm_order", failure_type="StepTimedOut")

    answer: dict[str, list[str]] = {}
    for name, value in confirmation.context["hidden"]:
        answer.setdefault(name, []).append(str(value))
    client.post(CHANGELIST, {**answer, "post": "yes"})

    assert SagaInstance.objects.get(id=alike.id).status == SagaStatus.RUNNING  # shown, retried
    assert SagaInstance.objects.get(id=other.id).status == SagaStatus.NEEDS_ATTENTION  # never shown
