"""Copies of one message running at the same time, on the real workers.

At least once also means "two copies at once": a redelivery, a retry and a sweeper
re-publish can overlap. Each test publishes several copies of a step's real message back
to back (each with a task id of its own, as a re-publish has), so that the service's
worker processes run them concurrently, and then checks that the effect happened once.
The forced interleavings around the provider call are in tests/test_payment_races.py.
"""

from typing import Any

import pytest
from celery.result import AsyncResult

from devstack.topology import wait_for
from orders.saga import PLACE_ORDER
from payments.models import PaymentAttempt
from payments.resilience import breaker_reset, provider_breaker
from saga.engine import build_chain
from saga.models import SagaInstance

from .api import Api, make_product, stock
from .test_duplicates import snapshot

pytestmark = pytest.mark.integration

COPIES = 4


@pytest.fixture(autouse=True)
def _closed_breaker(db_access: None) -> Any:
    breaker_reset()
    yield
    breaker_reset()


def publish_copies(saga: SagaInstance, step_name: str, ctx: dict, copies: int = COPIES) -> list[AsyncResult]:
    """Publish `copies` copies of the step's message at once, as the saga publishes it (the
    coordinator's authority for that step and phase, a generation of their own each)."""
    specs = {s.name: s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps()}
    phase = "forward" if specs[step_name] in PLACE_ORDER.steps else "compensation"
    signatures = [
        build_chain(
            (specs[step_name],), saga_id=saga.id, generation=saga.generation + 200 + i, phase=phase, context=ctx
        )
        for i in range(copies)
    ]
    return [signature.apply_async(ignore_result=False) for signature in signatures]


def outcomes(results: list[AsyncResult]) -> list[Any]:
    """Each copy's return value, or its exception (copies may refuse; none may crash)."""
    return [result.get(timeout=90, propagate=False) for result in results]


def test_racing_copies_of_every_forward_step_take_effect_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    order = api.wait_until_final(api.place_order([(sku, 2)])["id"])
    assert order["status"] == "confirmed"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["reserve_inventory", "charge_payment", "confirm_order", "notify_customer"]:
        results = outcomes(publish_copies(saga, step, saga.context))
        assert all(isinstance(r, dict) and r["saga_id"] == str(saga.id) for r in results), (step, results)

    assert snapshot(order["id"], saga, sku) == before
    assert before["stock"] == (5, 2)
    assert before["provider"] == [("charge", "succeeded")]


def test_racing_copies_of_every_compensation_take_effect_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    placed = api.place_order([(sku, 2)], token="tok_slow")
    api.post(f"/api/orders/{placed['id']}/cancel/")
    order = api.wait_until_final(placed["id"], timeout=120)
    assert order["status"] == "cancelled"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    before = snapshot(order["id"], saga, sku)

    for step in ["refund_payment", "release_inventory", "fail_order", "notify_failure"]:
        results = outcomes(publish_copies(saga, step, saga.context))
        assert all(isinstance(r, dict) for r in results), (step, results)

    assert snapshot(order["id"], saga, sku) == before
    assert before["stock"] == (5, 0)
    assert [n["kind"] for n in api.notifications(order["id"])] == ["order_cancelled"]


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
    copies = publish_copies(saga, "charge_payment", SagaInstance.objects.get(id=saga.id).context)
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
