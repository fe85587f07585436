"""Every step and compensation may be delivered twice: the second run changes nothing.

The duplicates are the real messages: each step's signature as the saga publishes it,
with its `link` back to the coordinator, sent again to its service's queue.
"""

import pytest

from inventory.models import ProcessedKey as InventoryKey
from notifications.models import Notification
from orders.saga import PLACE_ORDER
from payments.models import FakeProviderOperation, Payment
from saga.engine import build_chain
from saga.models import SagaInstance, SagaStep

from .api import Api, make_product, steps_by_name, stock

pytestmark = pytest.mark.integration


def redeliver(saga: SagaInstance, step_name: str, ctx: dict) -> dict:
    """Publish the step's message again, exactly as the saga did, and wait for it to run."""
    specs = {s.name: s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps()}
    phase = "forward" if specs[step_name] in PLACE_ORDER.steps else "compensation"
    signature = build_chain(
        (specs[step_name],), saga_id=saga.id, generation=saga.generation + 100, phase=phase, context=ctx
    )
    result = signature.apply_async(ignore_result=False)
    return result.get(timeout=60, propagate=True)


def snapshot(order_id: str, saga: SagaInstance, sku: str) -> dict:
    return {
        "stock": stock(sku),
        "payments": sorted(Payment.objects.filter(order_id=order_id).values_list("status", flat=True)),
        "provider": sorted(
            FakeProviderOperation.objects.filter(idempotency_key__startswith=str(saga.id)).values_list(
                "kind", "outcome"
            )
        ),
        "notifications": sorted(Notification.objects.filter(order_id=order_id).values_list("kind", "channel")),
        "inventory_keys": InventoryKey.objects.filter(key__startswith=str(saga.id)).count(),
        "steps": sorted(SagaStep.objects.filter(saga=saga).values_list("name", "status")),
        "saga": SagaInstance.objects.get(id=saga.id).status,
    }


def test_each_forward_step_run_twice_takes_effect_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    order = api.wait_until_final(api.place_order([(sku, 2)])["id"])
    assert order["status"] == "confirmed"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["reserve_inventory", "charge_payment", "confirm_order", "notify_customer"]:
        output = redeliver(saga, step, saga.context)
        assert output["saga_id"] == str(saga.id)

    assert snapshot(order["id"], saga, sku) == before
    assert before["stock"] == (5, 2)
    assert before["provider"] == [("charge", "succeeded")]
    assert api.order(order["id"])["status"] == "confirmed"


def test_each_compensation_run_twice_takes_effect_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    placed = api.place_order([(sku, 2)], token="tok_slow")
    api.post(f"/api/orders/{placed['id']}/cancel/")
    order = api.wait_until_final(placed["id"], timeout=120)
    assert order["status"] == "cancelled"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["refund_payment", "release_inventory", "fail_order", "notify_failure"]:
        redeliver(saga, step, saga.context)

    assert snapshot(order["id"], saga, sku) == before
    assert before["stock"] == (5, 0)
    assert api.order(order["id"])["status"] == "cancelled"
    assert [n["kind"] for n in api.notifications(order["id"])] == ["order_cancelled"]


def test_forward_steps_arriving_after_their_compensation_refuse_to_act(api: Api, sku: str) -> None:
    make_product(sku, on_hand=1)
    order = api.wait_until_final(api.place_order([(sku, 2)])["id"])
    assert order["status"] == "failed"  # not enough stock: nothing reserved, nothing charged
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    make_product(sku, on_hand=10)  # now the reservation could succeed...

    # ...but late copies of the forward steps (e.g. redelivered after a crash) meet the
    # tombstones their compensations left.
    with pytest.raises(Exception, match="already released"):
        redeliver(saga, "reserve_inventory", saga.context)
    with pytest.raises(Exception, match="already compensated"):
        redeliver(saga, "charge_payment", {**saga.context, "amount": "20.00"})

    assert stock(sku) == (10, 0)
    assert api.payments(order["id"]) == []
    assert FakeProviderOperation.objects.filter(idempotency_key__startswith=str(saga.id)).count() == 0
    final = api.order(order["id"])
    assert (final["status"], final["saga"]["status"]) == ("failed", "compensated")
    assert steps_by_name(final)["reserve_inventory"]["status"] == "failed"
