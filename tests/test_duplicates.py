"""Every step and compensation may be delivered again, or run as several copies at once:
what the copies do beyond the first changes nothing.

The copies are the real messages: each step's signature as the saga publishes it (the
coordinator's authority for that step and phase, its `link` back to the coordinator), sent
again to its service's queue. Four copies published back to back, each with a task id of
its own as a re-publish has, run concurrently in the service's worker processes: at least
once also means "two copies at the same time" (a redelivery, a retry and a sweeper
re-publish overlapping). The forced interleavings around the provider call are in
tests/test_payment_races.py, and notification copies racing SMTP in tests/test_races.py.
"""

from typing import Any

import pytest
from celery.result import AsyncResult

from devstack.topology import wait_for
from inventory.models import ProcessedKey as InventoryKey
from notifications.models import Notification
from orders.saga import PLACE_ORDER
from payments.models import FakeProviderOperation, Payment, PaymentAttempt
from payments.resilience import breaker_reset, provider_breaker
from saga.engine import build_chain
from saga.models import SagaInstance, SagaStep

from .api import Api, make_product, result_wait, steps_by_name, stock

pytestmark = [pytest.mark.integration, pytest.mark.broker]

# Delivered once more, or four copies at once.
COPIES = pytest.mark.parametrize("copies", [1, 4], ids=["again", "four-at-once"])


def publish_copies(
    saga: SagaInstance, step_name: str, ctx: dict, copies: int = 1, *, first: int = 100
) -> list[AsyncResult]:
    """Publish `copies` copies of the step's message at once, exactly as the saga does (a
    generation of their own each, from `first` above the saga's, so each has its own task id)."""
    specs = {s.name: s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps()}
    phase = "forward" if specs[step_name] in PLACE_ORDER.steps else "compensation"
    return [
        build_chain(
            (specs[step_name],), saga_id=saga.id, generation=saga.generation + first + i, phase=phase, context=ctx
        ).apply_async(ignore_result=False)
        for i in range(copies)
    ]


def outcomes(results: list[AsyncResult]) -> list[Any]:
    """Each copy's return value, or its exception (copies may refuse; none may crash)."""
    return [result_wait(result, 90) for result in results]


def redeliver(saga: SagaInstance, step_name: str, ctx: dict) -> dict:
    """Publish the step's message again, exactly as the saga did, and wait for it to run."""
    [result] = publish_copies(saga, step_name, ctx)
    return result_wait(result, 60, propagate=True)


@pytest.fixture(autouse=True)
def _closed_breaker(db_access: None) -> Any:
    """The circuit test opens the provider's circuit for every worker: closed around each test."""
    breaker_reset()
    yield
    breaker_reset()


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


@COPIES
def test_each_forward_step_delivered_again_takes_effect_once(api: Api, sku: str, copies: int) -> None:
    make_product(sku, on_hand=5)
    order = api.wait_until_final(api.place_order([(sku, 2)])["id"])
    assert order["status"] == "confirmed"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["reserve_inventory", "charge_payment", "confirm_order", "notify_customer"]:
        results = outcomes(publish_copies(saga, step, saga.context, copies))
        assert all(isinstance(r, dict) and r["saga_id"] == str(saga.id) for r in results), (step, results)

    assert snapshot(order["id"], saga, sku) == before
    assert before["stock"] == (5, 2)
    assert before["provider"] == [("charge", "succeeded")]
    assert api.order(order["id"])["status"] == "confirmed"


@COPIES
def test_each_compensation_delivered_again_takes_effect_once(api: Api, sku: str, copies: int) -> None:
    make_product(sku, on_hand=5)
    placed = api.place_order([(sku, 2)], token="tok_slow")
    api.post(f"/api/orders/{placed['id']}/cancel/")
    order = api.wait_until_final(placed["id"], timeout=120)
    assert order["status"] == "cancelled"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["refund_payment", "release_inventory", "fail_order", "notify_failure"]:
        results = outcomes(publish_copies(saga, step, saga.context, copies))
        assert all(isinstance(r, dict) for r in results), (step, results)

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


def test_charge_copies_racing_a_charge_in_flight_with_the_circuit_open_and_a_cancel(api: Api, sku: str) -> None:
    """The race issue 11 found: copies of the charge failing fast (circuit open) while the
    first copy is at the provider, and the customer cancelling meanwhile. Whatever the
    timing, the money ends refunded or never charged, and the order cancelled."""
    make_product(sku, on_hand=5)
    placed = api.place_order([(sku, 1)], token="tok_slow")
    saga = SagaInstance.objects.get(id=placed["saga"]["id"])
    wait_for(
        lambda: PaymentAttempt.objects.filter(payment__saga_id=saga.id, outcome="").exists(),
        timeout=60,
        what="the first charge attempt to reach the provider",
    )
    provider_breaker().open()
    copies = publish_copies(saga, "charge_payment", SagaInstance.objects.get(id=saga.id).context, copies=4)
    wait_for(
        lambda: PaymentAttempt.objects.filter(payment__saga_id=saga.id, outcome="not_sent").count() >= 2,
        timeout=60,
        what="copies of the charge to fail fast on the open circuit",
    )
    assert api.post(f"/api/orders/{placed['id']}/cancel/").status_code == 202
    breaker_reset()

    order = api.wait_until_final(placed["id"], timeout=150)
    outcomes(copies)
    assert (order["status"], order["saga"]["status"]) == ("cancelled", "compensated")
    final = snapshot(order["id"], saga, sku)
    assert final["stock"] == (5, 0)
    assert final["provider"] in ([("charge", "succeeded"), ("refund", "succeeded")], [("charge", "voided")])
    assert final["payments"] in (["refunded"], ["voided"])
    assert [n["kind"] for n in api.notifications(order["id"])] == ["order_cancelled"]
    assert stock(sku) == (5, 0)


@COPIES
def test_copies_of_a_declined_charge_charge_nothing_though_no_refund_ran(api: Api, sku: str, copies: int) -> None:
    """The saga runs no refund after a decline (Step.final_failures): what keeps a late or
    racing copy of the charge from charging is the decline recorded under the charge's key,
    final at the provider. Here with the circuit open around half of them, too."""
    make_product(sku, on_hand=5)
    order = api.wait_until_final(api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"])
    assert order["status"] == "failed"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    assert steps_by_name(order)["refund_payment"]["status"] == "not_needed"
    before = snapshot(order["id"], saga, sku)

    results = publish_copies(saga, "charge_payment", saga.context, copies)
    provider_breaker().open()  # the copies still queued meet an open circuit
    results += publish_copies(saga, "charge_payment", saga.context, copies, first=200)
    done = outcomes(results)
    breaker_reset()
    # Each copy raises the recorded decline again (no call reaches the provider for it).
    assert {type(r).__name__ for r in done} == {"PaymentDeclined"}, done
    assert snapshot(order["id"], saga, sku) == before
    assert before["provider"] == [("charge", "declined")]
    assert before["payments"] == ["declined"]
    assert PaymentAttempt.objects.filter(payment__order_id=order["id"]).count() == 1
