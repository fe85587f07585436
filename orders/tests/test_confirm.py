"""The pivot's usual case in one statement (orders.services._confirm_at_once) writes what
the general way writes, and writes nothing in any other case.

Two sagas placed alike are confirmed with the same chain record at the same instant, one
each way; their rows must then be equal but for their own ids. Racing copies of the
confirm, a cancel and the coordinator's decision to compensate are in
tests/test_pivot_races.py (committed transactions, one thread each).
"""

import uuid
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from common.db import insert_together
from common.exceptions import StepRefused
from common.sql import PreparedCursor
from orders import services
from orders.models import Order
from orders.saga import PLACE_ORDER, PLACE_ORDER_V2
from saga.definition import SagaDefinition, get_definition
from saga.engine import task_id_for
from saga.models import SagaInstance, SagaStatus, SagaStep, StepStatus
from saga.publish import saga_new
from saga.tests.coordinator import snapshot

pytestmark = pytest.mark.django_db(databases=["orders"])

TOTAL = Decimal("25.00")


def placed(definition: SagaDefinition | None = None) -> tuple[Order, SagaInstance]:
    """A pending order and its saga, written as order_place writes them (not published)."""
    order = Order(user_id=0, email="pivot@example.com", payment_token="tok_visa", total=TOTAL, currency="EUR")
    saga = saga_new(
        definition=definition or get_definition(PLACE_ORDER.name),
        order_id=order.id,
        context={"email": order.email, "total": str(TOTAL), "currency": "EUR", "items": []},
    )
    insert_together("orders", [order], [saga], saga._prefetched_objects_cache["steps"])  # type: ignore[attr-defined]
    return order, saga


def chain_record(saga: SagaInstance, at: datetime, names: tuple[str, ...] = ("reserve_inventory", "charge_payment")):
    """The `_steps` the confirm receives: each step's record, as common.steps writes it."""
    outputs = {
        "reserve_inventory": {"reserved": [{"sku": "MUG", "quantity": 1}], "amount": str(TOTAL)},
        "charge_payment": {"payment_id": str(uuid.uuid4()), "status": "captured"},
    }
    return [
        {
            "task_id": task_id_for(saga.id, name, saga.generation),
            "started_at": (at + timedelta(milliseconds=10 * i)).isoformat(),
            "finished_at": (at + timedelta(milliseconds=10 * i + 4)).isoformat(),
            "attempt": 1 + i,
            "worker": f"{name.split('_')[0]}@host",
            "output": outputs.get(name, {}),
        }
        for i, name in enumerate(names)
    ]


def state(order: Order, saga: SagaInstance) -> dict[str, Any]:
    """Every column of the order's status, the saga and its steps, with the saga's own ids
    written as SAGA (and the outputs' payment id as PAYMENT), so two sagas compare."""

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(str(saga.id), "SAGA").replace(str(order.id), "ORDER")
        if isinstance(value, dict):
            return {k: "PAYMENT" if k == "payment_id" else plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    def kept(columns: dict[str, Any]) -> dict[str, Any]:
        skip = {"id", "order_id", "saga_id", "trace_context", "trace_id", "created_at"}
        return {name: plain(value) for name, value in columns.items() if name not in skip}

    saga_columns, step_columns = snapshot(saga)
    return {
        "order": Order.objects.using("orders").get(id=order.id).status,
        "saga": kept(saga_columns),
        "steps": {name: kept(columns) for name, columns in step_columns.items()},
    }


@pytest.fixture
def frozen(monkeypatch) -> datetime:
    """Both ways read the clock (the pivot's time, the next step's deadline): one instant."""
    now = timezone.now().replace(microsecond=0)
    monkeypatch.setattr(timezone, "now", lambda: now)
    return now


def test_the_usual_confirm_writes_what_the_general_way_writes(monkeypatch, frozen: datetime) -> None:
    fast_order, fast_saga = placed()
    general_order, general_saga = placed()
    started = frozen - timedelta(seconds=1)

    sent: list[str] = []
    execute = PreparedCursor.execute
    monkeypatch.setattr(
        PreparedCursor, "execute", lambda self, sql, params=(): sent.append(sql) or execute(self, sql, params)
    )
    with CaptureQueriesContext(connections["orders"]) as queries:
        confirmed = services.order_confirm(
            order_id=fast_order.id, saga_id=fast_saga.id, total=TOTAL, timeline=chain_record(fast_saga, started)
        )
    assert confirmed == {"outcome": "confirmed"}
    # The statement that locks, checks, records and confirms, and nothing else.
    assert (len(sent), len(queries)) == (1, 0), [sql[:80] for sql in sent] + [q["sql"][:80] for q in queries]

    monkeypatch.setattr(services, "_confirm_at_once", lambda **_: False)
    assert services.order_confirm(
        order_id=general_order.id, saga_id=general_saga.id, total=TOTAL, timeline=chain_record(general_saga, started)
    ) == {"outcome": "confirmed"}

    fast, general = state(fast_order, fast_saga), state(general_order, general_saga)
    # The chain's records differ only by the payment id (PAYMENT in both).
    assert fast == general
    assert fast["order"] == Order.Status.CONFIRMED
    assert fast["saga"]["pivot_committed_at"] == frozen and fast["saga"]["current_step"] == "notify_customer"
    steps = fast["steps"]
    assert [steps[n]["status"] for n in ("reserve_inventory", "charge_payment", "confirm_order")] == [
        StepStatus.SUCCEEDED
    ] * 3
    assert (steps["charge_payment"]["attempts"], steps["charge_payment"]["worker"]) == (2, "charge@host")
    assert steps["notify_customer"]["status"] == StepStatus.RUNNING
    assert steps["notify_customer"]["celery_task_id"] == "SAGA-notify_customer-g0"


def test_a_redelivered_confirm_takes_the_general_way_and_is_confirmed_again(frozen: datetime) -> None:
    order, saga = placed()
    timeline = chain_record(saga, frozen)
    assert services.order_confirm(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)
    before = state(order, saga)
    assert not services._confirm_at_once(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)
    assert services.order_confirm(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline) == {
        "outcome": "confirmed"
    }
    assert state(order, saga) == before


def _cancel_asked(order: Order, saga: SagaInstance) -> None:
    Order.objects.using("orders").filter(id=order.id).update(cancel_requested_at=timezone.now())


def _compensating(order: Order, saga: SagaInstance) -> None:
    SagaInstance.objects.using("orders").filter(id=saga.id).update(status=SagaStatus.COMPENSATING, outcome="failed")


def _charge_failed(order: Order, saga: SagaInstance) -> None:
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name="charge_payment").update(status=StepStatus.FAILED)


def _notify_running(order: Order, saga: SagaInstance) -> None:
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name="notify_customer").update(status=StepStatus.RUNNING)


@pytest.mark.parametrize(
    ("case", "change", "total", "names", "refused"),
    [
        ("a cancel was asked", _cancel_asked, TOTAL, None, r"confirmed \(the customer asked to cancel it\)"),
        ("the saga is compensating", _compensating, TOTAL, None, r"confirmed \(its saga is no longer running\)"),
        ("another total", None, Decimal("24.99"), None, "the saga charged 24.99"),
        ("a step's record is missing", None, TOTAL, ("reserve_inventory",), None),
        ("a step is recorded twice", None, TOTAL, ("reserve_inventory", "charge_payment", "charge_payment"), None),
        ("the timeline names a step after the pivot", None, TOTAL, ("reserve_inventory", "notify_customer"), None),
        ("a step before the pivot failed", _charge_failed, TOTAL, None, None),
        ("the step after the pivot is under way", _notify_running, TOTAL, None, None),
    ],
)
def test_any_other_case_writes_nothing_in_one_statement_and_the_general_way_decides(
    frozen: datetime, case: str, change: Any, total: Decimal, names: tuple[str, ...] | None, refused: str | None
) -> None:
    order, saga = placed()
    if change:
        change(order, saga)
    timeline = chain_record(saga, frozen, *([names] if names else []))
    before = state(order, saga)
    assert not services._confirm_at_once(order_id=order.id, saga_id=saga.id, total=total, timeline=timeline), case
    assert state(order, saga) == before, case
    if refused:
        with pytest.raises(StepRefused, match=refused):
            services.order_confirm(order_id=order.id, saga_id=saga.id, total=total, timeline=timeline)
    else:
        # The general way records what it can (and marks what it cannot know unknown).
        assert services.order_confirm(order_id=order.id, saga_id=saga.id, total=total, timeline=timeline)


def test_a_saga_of_another_version_than_the_one_this_deployment_starts_takes_the_general_way(
    monkeypatch, frozen: datetime
) -> None:
    order, saga = placed()  # version 1; the deployment now starts version 2
    monkeypatch.setattr(services, "get_definition", lambda name: PLACE_ORDER_V2)
    timeline = chain_record(saga, frozen)
    before = state(order, saga)
    assert not services._confirm_at_once(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)
    assert state(order, saga) == before
    # The general way finds the saga's own version (saga.definition.get_definition).
    assert services.order_confirm(order_id=order.id, saga_id=saga.id, total=TOTAL, timeline=timeline)
    assert SagaInstance.objects.using("orders").get(id=saga.id).pivot_committed_at == frozen


@pytest.mark.parametrize(
    ("status", "outcome", "said"),
    [
        (SagaStatus.NEEDS_ATTENTION, "", "order can no longer be cancelled: our staff are completing it"),
        (SagaStatus.COMPENSATING, "failed", "order is already being failed"),
        (SagaStatus.COMPLETED, "", "order can no longer be cancelled (its saga is completed)"),
    ],
)
def test_a_cancel_the_saga_no_longer_takes_says_why_in_words(status: str, outcome: str, said: str) -> None:
    """A pivot that never reported back leaves the saga needing an operator with no
    outcome, and the customer was told "order is already being needs_attention"."""
    order, saga = placed()
    SagaInstance.objects.using("orders").filter(id=saga.id).update(status=status, outcome=outcome)
    with pytest.raises(services.OrderNotCancellable) as refused:
        services.order_cancel(order_id=order.id)
    assert str(refused.value) == said
