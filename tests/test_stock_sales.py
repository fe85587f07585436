"""A confirmed order's reservation becomes a sale (issue 13): on hand falls, and
`reserved` counts only orders in flight.

The coordinator's sweep sends inventory one settlement per batch of confirmed sagas
(saga.settlement): `inventory.record_sales(saga_ids) | saga.settled`. These tests go
through that real path, and race copies of the settlement message the way a lost-and-
re-sent batch, or two sweepers, would deliver them.
"""

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from audit.invariants import audit
from common.exceptions import InvalidMessage
from common.signing import AUTHORITY_KWARG, batch_authority_mint
from devstack.topology import Topology, wait_for
from inventory.models import Reservation
from inventory.services import stock_release, stock_reserve
from inventory.tasks import RECORD_SALES, record_sales
from orders.saga import PLACE_ORDER
from saga.engine import settlement_chain
from saga.models import SagaInstance, SagaStatus
from saga.tasks import settled

from .api import Api, make_product, result_wait, shelf, wait_settled
from .test_races import queued

pytestmark = [pytest.mark.integration, pytest.mark.broker]


def test_confirmed_orders_sell_their_stock_and_reserved_counts_only_orders_in_flight(api: Api, sku: str) -> None:
    make_product(sku, on_hand=10)

    placed = [api.place_order([(sku, 2)]) for _ in range(3)]
    placed.append(api.place_order([(sku, 1)], token="tok_chargeDeclined"))
    orders = [api.wait_until_final(order["id"]) for order in placed]
    assert [order["status"] for order in orders] == ["confirmed"] * 3 + ["failed"]
    saga_ids = [order["saga"]["id"] for order in orders]
    wait_settled(saga_ids)

    # Six units left the warehouse; nothing is held any more; the declined order's unit went back.
    assert shelf(sku) == (4, 0, 6)
    by_order = dict(Reservation.objects.filter(sku=sku).values_list("order_id", "status"))
    assert {str(k): v for k, v in by_order.items()} == {
        **{order["id"]: "sold" for order in orders[:3]},
        orders[3]["id"]: "released",
    }
    assert all(r.sold_at is not None for r in Reservation.objects.filter(sku=sku, status="sold"))
    sagas = {str(s.id): s for s in SagaInstance.objects.filter(id__in=saga_ids)}
    assert [sagas[i].settled_at is not None for i in saga_ids] == [True, True, True, False]
    ours = [sku, *(o["id"] for o in orders), *saga_ids]
    violations = audit(grace=timedelta(0), initial_stock={sku: 10})
    assert [v for v in violations if any(x in v for x in ours)] == []


def confirmed_saga(sku: str, quantity: int) -> SagaInstance:
    """A saga past its pivot whose stock is still held, which the sweep leaves alone for an
    hour (as if it had just sent it): the settlement is the test's to send."""
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    stock_reserve(saga_id=saga_id, order_id=order_id, lines=[(sku, quantity, Decimal("10.00"))])
    now = timezone.now()
    return SagaInstance.objects.create(
        id=saga_id,
        definition=PLACE_ORDER.name,
        definition_version=PLACE_ORDER.version,
        order_id=order_id,
        status=SagaStatus.COMPLETED,
        pivot_committed_at=now,
        settlement_sent_at=now + timedelta(hours=1),
    )


def test_racing_copies_of_a_settlement_sell_the_stock_once(topology: Topology, sku: str) -> None:
    make_product(sku, on_hand=10)
    sagas = [confirmed_saga(sku, 1), confirmed_saga(sku, 3)]
    assert shelf(sku) == (10, 4, 0)
    assert PLACE_ORDER.settlement is not None
    worker = topology.processes["inventory"]
    worker.stop()
    try:
        copies = []
        for _ in range(3):
            chain = settlement_chain(PLACE_ORDER.settlement, saga_ids=[s.id for s in sagas])
            chain.tasks[-1].set(ignore_result=False)  # saga.settled: how many sagas this copy stamped
            copies.append(chain.apply_async())
        wait_for(lambda: queued("inventory") >= 3, timeout=30, what="the copies to be queued")
    finally:
        worker.start(topology.env)
        topology.wait_ready(["inventory"])

    # The worker's pool takes the copies together: each waits on the rows the first locked.
    stamped = [result_wait(copy, 60, propagate=True) for copy in copies]

    assert sum(stamped) == 2  # each saga stamped settled once, whichever copy did it
    assert shelf(sku) == (6, 0, 4)
    assert sorted(Reservation.objects.filter(sku=sku).values_list("status", flat=True)) == ["sold", "sold"]
    assert all(s.settled_at for s in SagaInstance.objects.filter(id__in=[s.id for s in sagas]))
    # A sold reservation is never given back, even by a (forged or mistaken) release.
    assert stock_release(saga_id=sagas[0].id) == {"released": []}
    assert shelf(sku) == (6, 0, 4)


def test_a_settlement_acts_only_on_the_batch_the_coordinator_signed(db_access: None, sku: str) -> None:
    make_product(sku, on_hand=5)
    signed, added = confirmed_saga(sku, 1), confirmed_saga(sku, 2)
    authority = batch_authority_mint(task=RECORD_SALES, saga_ids=[signed.id])

    with pytest.raises(InvalidMessage, match="not the one the coordinator signed"):
        record_sales.run([str(signed.id), str(added.id)], **{AUTHORITY_KWARG: authority})
    with pytest.raises(InvalidMessage, match="no batch authority"):
        record_sales.run([str(signed.id)])
    assert shelf(sku) == (5, 3, 0)

    output = record_sales.run([str(signed.id)], **{AUTHORITY_KWARG: authority})

    assert output["sagas"] == [str(signed.id)]
    assert shelf(sku) == (4, 2, 1)
    # Leave nothing in flight for the tests after this one (tests/test_messages.py waits for
    # every recent confirmed saga to settle): the coordinator records the batch it signed,
    # and the saga outside it gives its stock back and is settled as having nothing to sell.
    assert settled.run(output, step=PLACE_ORDER.settlement.name) == 1
    stock_release(saga_id=added.id)
    SagaInstance.objects.filter(id=added.id).update(settled_at=timezone.now())
