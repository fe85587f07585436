"""The admin's saga actions act on what their confirmation showed, and their pages ask for
the view permission too. In this process, no workers: nothing the tests write commits."""

from decimal import Decimal

import pytest
from django.db import transaction

from orders.models import Order
from orders.saga import PLACE_ORDER
from saga.models import SagaInstance, SagaStatus
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
