"""The customer pays what `POST /api/orders/` quoted, or the order fails and nothing is charged.

The price changes between the quote and the reserve step deterministically: the inventory
worker is stopped while the order is placed and the catalogue is changed, so the reserve
message waits in its queue until the worker is back.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal

import pytest

from devstack.topology import Topology
from inventory.models import Reservation
from inventory.services import product_update
from notifications.models import Notification
from payments.models import FakeProviderOperation, Payment
from saga.models import SagaInstance

from .api import Api, make_product, steps_by_name, stock

pytestmark = [pytest.mark.integration, pytest.mark.broker]


@contextmanager
def inventory_paused(topology: Topology) -> Iterator[None]:
    """No reserve step runs inside the block: its message waits in the inventory queue."""
    inventory = topology.processes["inventory"]
    inventory.stop()
    try:
        yield
    finally:
        inventory.start(topology.env)
        topology.wait_ready(["inventory"])


def provider_ops(saga_id: str) -> list[tuple[str, str]]:
    return sorted(
        FakeProviderOperation.objects.filter(idempotency_key__startswith=saga_id).values_list("kind", "outcome")
    )


def test_a_price_change_after_the_quote_fails_the_order_and_charges_nothing(
    api: Api, topology: Topology, sku: str
) -> None:
    make_product(sku, on_hand=5, price="10.00")
    with inventory_paused(topology):
        placed = api.place_order([(sku, 2)])
        assert (placed["total"], placed["items"][0]["unit_price"]) == ("20.00", "10.00")
        product_update(sku=sku, name=f"Test product {sku}", price=Decimal("12.00"))

    order = api.wait_until_final(placed["id"], timeout=90)

    # The customer is told the fixed reason for a price change (orders.failure_text); the
    # operator's view keeps which price changed, from what to what.
    told = "a price changed since you ordered; nothing was charged"
    assert (order["status"], order["failure_reason"], order["total"]) == ("failed", told, "20.00")
    assert order["saga"]["status"] == "compensated"
    saga = SagaInstance.objects.get(id=order["saga"]["id"])
    reason = f"price_changed: the price of {sku} changed from 10.00 to 12.00 since you ordered; nothing was charged"
    assert (saga.failure_type, saga.failure_reason) == ("PriceChanged", reason)
    steps = steps_by_name(order)
    assert steps["reserve_inventory"]["status"] == "failed"
    assert steps["reserve_inventory"]["last_error"] == "PriceChanged"
    # Nothing charged, nothing held, nothing reserved at either price.
    assert api.payments(order["id"]) == []
    assert provider_ops(order["saga"]["id"]) == []
    assert stock(sku) == (5, 0)
    assert not Reservation.objects.filter(order_id=order["id"]).exists()
    # The customer is told once, with the reason.
    [notification] = Notification.objects.filter(order_id=order["id"])
    assert (notification.kind, notification.channel, notification.status) == ("order_failed", "email", "sent")
    assert told in notification.body


def test_an_unchanged_price_confirms_at_the_quoted_total(api: Api, topology: Topology, sku: str) -> None:
    other = f"{sku}-B"
    make_product(sku, on_hand=5, price="10.00")
    make_product(other, on_hand=5, price="2.25")
    with inventory_paused(topology):
        placed = api.place_order([(sku, 2), (other, 3)])
        assert placed["total"] == "26.75"
        # A catalogue change that leaves the price alone (goods received) changes nothing.
        product_update(sku=sku, name="Renamed", price=Decimal("10.00"), on_hand_delta=1)

    order = api.wait_until_final(placed["id"], timeout=90)

    assert (order["status"], order["total"], order["failure_reason"]) == ("confirmed", "26.75", "")
    [payment] = Payment.objects.filter(order_id=order["id"])
    assert (str(payment.amount), payment.status) == ("26.75", "captured")
    assert provider_ops(order["saga"]["id"]) == [("charge", "succeeded")]
    assert stock(sku) == (6, 2) and stock(other) == (5, 3)
    held = Reservation.objects.filter(order_id=order["id"]).order_by("sku")
    assert [(r.sku, r.quantity, str(r.unit_price)) for r in held] == [(sku, 2, "10.00"), (other, 3, "2.25")]
    [notification] = Notification.objects.filter(order_id=order["id"])
    assert "we charged 26.75" in notification.body
