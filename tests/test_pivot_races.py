"""Copies of the pivot (orders.confirm) racing each other, a customer's cancel and the
coordinator's decision to compensate.

The usual confirm is one statement now (orders.services._confirm_at_once): it takes the
order's row lock, then the saga's, and writes only if the order is still pending with no
cancel asked and the saga still running short of its pivot. These tests force each
interleaving with a transaction that holds the order's row (tests/test_compensation_races.py,
`behind`), and wait on PostgreSQL's own view of who waits on a lock, never on a fixed sleep.
Each copy is a thread with its own connection to the real database.
"""

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from common.db import insert_together
from common.exceptions import StepRefused
from orders import services
from orders.exceptions import OrderNotCancellable
from orders.models import Order
from orders.saga import PLACE_ORDER
from saga.engine import task_id_for
from saga.models import SagaInstance, SagaStatus, SagaStep, StepStatus
from saga.publish import saga_new

from .test_compensation_races import behind
from .test_payment_races import Copy

pytestmark = pytest.mark.usefixtures("db_access")

TOTAL = Decimal("12.00")
CONFIRMED = {"outcome": "confirmed"}

# The `at_the_pivot` fixture: makes one, returns (order, saga, the chain's record).
MakeSaga = Callable[[], tuple[Order, SagaInstance, list[dict[str, Any]]]]


@pytest.fixture
def at_the_pivot() -> Iterator[MakeSaga]:
    """A pending order whose saga's chain has reached the confirm: written as order_place
    writes them, with the record of the two steps before the pivot that the confirm's
    message carries. Nothing is published (no worker runs these steps).

    Afterwards its sagas are ended and settled, so no sweep of a later test re-publishes
    or settles them."""
    made: list[uuid.UUID] = []

    def make() -> tuple[Order, SagaInstance, list[dict[str, Any]]]:
        order = Order(user_id=0, email="pivot@example.com", payment_token="tok_visa", total=TOTAL, currency="EUR")
        saga = saga_new(definition=PLACE_ORDER, order_id=order.id, context={"total": str(TOTAL), "items": []})
        insert_together("orders", [order], [saga], saga._prefetched_objects_cache["steps"])  # type: ignore[attr-defined]
        made.append(saga.id)
        finished = timezone.now() - timedelta(seconds=1)
        timeline = [
            {
                "task_id": task_id_for(saga.id, name, saga.generation),
                "started_at": (finished - timedelta(milliseconds=5)).isoformat(),
                "finished_at": finished.isoformat(),
                "attempt": 1,
                "worker": "w@host",
                "output": output,
            }
            for name, output in (
                ("reserve_inventory", {"amount": str(TOTAL)}),
                ("charge_payment", {"status": "captured"}),
            )
        ]
        return order, saga, timeline

    yield make
    SagaStep.objects.filter(saga_id__in=made, status=StepStatus.RUNNING).update(status=StepStatus.SUCCEEDED)
    now = timezone.now()
    SagaInstance.objects.filter(id__in=made).update(
        status=SagaStatus.COMPLETED, finished_at=now, settlement_sent_at=now, settled_at=now
    )


def confirm_copy(name: str, order: Order, saga: SagaInstance, timeline: list[dict[str, Any]]) -> Copy:
    return Copy(name, services.order_confirm, order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)


def lock_order(order: Order) -> None:
    Order.objects.select_for_update().get(id=order.id)


def test_racing_copies_of_the_confirm_record_the_pivot_once(at_the_pivot: MakeSaga) -> None:
    order, saga, timeline = at_the_pivot()
    copies = [confirm_copy(f"confirm-{i}", order, saga, timeline) for i in range(4)]
    behind("orders", lambda: lock_order(order), *copies, what="four confirms waiting on the order's row")

    assert [copy.outcome() for copy in copies] == [CONFIRMED] * 4
    order.refresh_from_db()
    row = SagaInstance.objects.get(id=saga.id)
    steps = {step.name: step for step in SagaStep.objects.filter(saga_id=saga.id)}
    assert order.status == Order.Status.CONFIRMED
    assert (row.status, row.current_step, row.pivot_committed_at is not None) == (
        SagaStatus.RUNNING,
        "notify_customer",
        True,
    )
    assert [steps[n].status for n in ("reserve_inventory", "charge_payment", "confirm_order")] == [
        StepStatus.SUCCEEDED
    ] * 3
    # Recorded once: one attempt of each, the notification published once.
    assert [steps[n].attempts for n in ("reserve_inventory", "charge_payment", "confirm_order")] == [1, 1, 1]
    assert steps["notify_customer"].status == StepStatus.RUNNING


@pytest.mark.parametrize("rival", ["a customer's cancel", "the coordinator's decision to compensate"])
def test_a_rival_that_holds_the_order_first_wins_and_the_confirm_refuses(at_the_pivot: MakeSaga, rival: str) -> None:
    order, saga, timeline = at_the_pivot()
    cancel = rival == "a customer's cancel"

    def decide() -> None:
        # As orders.services.order_cancel and the compensation's pivot guard
        # (orders.saga.order_lock_for_compensation) take them: the order's row, then the
        # saga's. Nothing is published.
        locked = Order.objects.select_for_update().get(id=order.id)
        SagaInstance.objects.select_for_update().get(id=saga.id)
        if cancel:
            locked.cancel_requested_at = timezone.now()
            locked.save(update_fields=["cancel_requested_at", "updated_at"])
        outcome = "cancelled" if cancel else "failed"
        SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.COMPENSATING, outcome=outcome)

    confirming = confirm_copy("confirm", order, saga, timeline)
    behind("orders", decide, confirming, what="the confirm waiting on the order's row")

    with pytest.raises(StepRefused, match="can no longer be confirmed"):
        confirming.outcome()
    order.refresh_from_db()
    assert order.status == Order.Status.PENDING
    assert SagaInstance.objects.get(id=saga.id).pivot_committed_at is None
    assert SagaStep.objects.get(saga_id=saga.id, name="confirm_order").status == StepStatus.PENDING


def test_a_cancel_waits_for_the_confirm_committing_and_is_refused(at_the_pivot: MakeSaga) -> None:
    order, saga, timeline = at_the_pivot()

    def confirm() -> None:
        assert services._confirm_at_once(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)

    cancelling = Copy("cancel", services.order_cancel, order_id=order.id)
    behind("orders", confirm, cancelling, what="the cancel waiting on the order's row")

    with pytest.raises(OrderNotCancellable, match="confirmed"):
        cancelling.outcome()
    order.refresh_from_db()
    assert (order.status, order.cancel_requested_at) == (Order.Status.CONFIRMED, None)
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.RUNNING


def test_nothing_is_left_locked_by_a_confirm_that_wrote_nothing(at_the_pivot: MakeSaga) -> None:
    """The statement commits on its own even when it writes nothing: its row locks are
    gone at once, not held until some later commit."""
    order, saga, timeline = at_the_pivot()
    assert not services._confirm_at_once(order_id=order.id, saga_id=saga.id, total=Decimal("1.00"), timeline=timeline)
    with transaction.atomic(using="orders"):
        Order.objects.select_for_update(nowait=True).get(id=order.id)
        SagaInstance.objects.select_for_update(nowait=True).get(id=saga.id)


def test_a_step_changed_while_the_confirm_waited_for_the_saga_undoes_the_statement(at_the_pivot: MakeSaga) -> None:
    """The statement read the steps before it waited for the saga's row; a step that a
    transaction holding that row changed meanwhile is checked again where it is written,
    and the statement undoes itself rather than write over it."""
    order, saga, timeline = at_the_pivot()

    def change() -> None:
        SagaInstance.objects.select_for_update().get(id=saga.id)
        SagaStep.objects.filter(saga_id=saga.id, name="charge_payment").update(status=StepStatus.FAILED)

    confirming = Copy(
        "confirm", services._confirm_at_once, order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline
    )
    behind("orders", change, confirming, what="the confirm waiting on the saga's row")

    assert confirming.outcome() is False
    order.refresh_from_db()
    steps = {step.name: step.status for step in SagaStep.objects.filter(saga_id=saga.id)}
    assert order.status == Order.Status.PENDING
    assert SagaInstance.objects.get(id=saga.id).pivot_committed_at is None
    assert steps == {
        "reserve_inventory": StepStatus.RUNNING,
        "charge_payment": StepStatus.FAILED,
        "confirm_order": StepStatus.PENDING,
        "notify_customer": StepStatus.PENDING,
    }


def test_the_pivot_cpu_measurement_confirms_orders_both_ways() -> None:
    """bench.pivot_cpu (BENCHMARKS.md's in-process figures) measures what it says: real
    confirms, each way, and the one-statement way left on."""
    from bench.pivot_cpu import WAYS, measure

    confirm_at_once, started = services._confirm_at_once, timezone.now()
    try:
        per_round = measure(rounds=2, orders=2)
    finally:
        # As `at_the_pivot` leaves its sagas: ended and settled, for no later sweep to touch.
        made = SagaInstance.objects.filter(
            created_at__gte=started, order_id__in=Order.objects.filter(email="bench@example.com").values("id")
        )
        SagaStep.objects.filter(saga__in=made, status=StepStatus.RUNNING).update(status=StepStatus.SUCCEEDED)
        now = timezone.now()
        assert made.update(status=SagaStatus.COMPLETED, finished_at=now, settlement_sent_at=now, settled_at=now) == 8
    assert {way: len(parts["python"]) for way, parts in per_round.items()} == dict.fromkeys(WAYS, 2)
    assert all(value > 0 for parts in per_round.values() for value in parts["python"])
    assert services._confirm_at_once is confirm_at_once
