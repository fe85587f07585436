"""Copies of the release and of the order's fail step racing each other, a reservation
that commits while the release runs, and a confirmation that commits while the order is
being failed.

Both compensations take their effect in a few statements now (inventory.services.
stock_release, orders.services.order_fail), and each statement reads with a snapshot
of its own: these tests force the interleavings that a snapshot taken too early would
get wrong. Each copy is a thread calling the service against the real database (its own
connection), as in tests/test_payment_races.py; the tests wait on PostgreSQL's own view
of who waits on a lock, never on a fixed sleep.
"""

import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import connections, transaction

from common.exceptions import StepRefused
from common.idempotency import step_key
from devstack.topology import wait_for
from inventory import services
from inventory.models import ProcessedKey, Reservation
from inventory.services import _reserve_at_once, stock_release, stock_reserve
from orders.models import Order
from orders.saga import PLACE_ORDER
from orders.services import order_fail
from saga.models import SagaInstance, SagaStatus
from saga.publish import saga_new

from .api import make_product, shelf
from .test_payment_races import Copy

pytestmark = pytest.mark.usefixtures("db_access")

PRICE = Decimal("10.00")


def waiting_on_a_lock(alias: str, count: int = 1) -> bool:
    """Whether `count` backends of `alias`'s database wait on a lock (a row, a key)."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] >= count


class Held(threading.Thread):
    """A transaction on `alias` that runs `fn`, then stays open (its locks held, its
    writes not yet visible) until `commit` is set."""

    def __init__(self, alias: str, fn: Any) -> None:
        super().__init__(daemon=True)
        self.alias, self.fn = alias, fn
        self.done, self.commit = threading.Event(), threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with transaction.atomic(using=self.alias):
                self.fn()
                self.done.set()
                assert self.commit.wait(30), "the test never let the transaction commit"
        except BaseException as error:
            self.error = error
            self.done.set()
        finally:
            connections.close_all()

    def finish(self) -> None:
        self.commit.set()
        self.join(30)
        assert not self.is_alive() and self.error is None, self.error


def behind(alias: str, hold: Callable[[], Any], *copies: Copy, what: str) -> None:
    """Run `hold` in a transaction on `alias` and keep it open, start `copies`, wait until
    each waits on a lock there (`what` names what they wait on), then let it commit."""
    held = Held(alias, hold)
    held.start()
    assert held.done.wait(30) and held.error is None
    for copy in copies:
        copy.start()
    wait_for(lambda: waiting_on_a_lock(alias, len(copies)), timeout=30, what=what)
    held.finish()


def test_a_release_waits_for_a_reservation_committing_and_gives_its_stock_back(sku: str) -> None:
    make_product(sku, on_hand=5, price=str(PRICE))
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    lines = [(sku, 2, PRICE)]
    result = {"reserved": [{"sku": sku, "quantity": 2}]}
    # The reservation's first copy, in one statement without the saga lock, not yet committed.
    release = Copy("release", stock_release, saga_id=saga_id)
    # The release's tombstone waits on the reservation's key...
    behind(
        "inventory",
        lambda: _reserve_at_once(saga_id=saga_id, order_id=order_id, lines=lines, result=result),
        release,
        what="the release waiting on the reservation's key",
    )

    # ...and then sees the reservation that committed meanwhile, and gives its stock back.
    assert release.outcome() == {"released": [{"sku": sku, "quantity": 2}]}
    assert shelf(sku) == (5, 0, 0)
    assert list(Reservation.objects.filter(saga_id=saga_id).values_list("status", flat=True)) == ["released"]
    keys = dict(ProcessedKey.objects.filter(key__startswith=str(saga_id)).values_list("key", "result"))
    assert keys[step_key(saga_id, "reserve_inventory", "undo")] == {"released": [{"sku": sku, "quantity": 2}]}
    # A late copy of the reservation meets the key and refuses to hold stock again.
    with pytest.raises(StepRefused, match="already released"):
        stock_reserve(saga_id=saga_id, order_id=order_id, lines=lines)
    assert shelf(sku) == (5, 0, 0)


def test_a_copy_that_took_the_general_way_meets_a_racing_copys_one_statement_reservation(
    sku: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy A went the general way (its one statement found stock it could not take, which
    was freed just after) and read no key under the saga lock; copy B's one statement,
    which takes no saga lock, then reserved and committed. A must return B's result, not
    reserve again (a second hold, or the key's unique index: an IntegrityError that failed
    the step for good and compensated a healthy order)."""
    make_product(sku, on_hand=5, price=str(PRICE))
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    lines = [(sku, 2, PRICE)]
    original_read = services.processed_results

    def at_once(**kwargs: Any) -> bool:
        if threading.current_thread().name == "A":
            return False  # as if the stock it needed was held a moment ago
        return _reserve_at_once(**kwargs)

    b_ran = threading.Event()

    def read_then_copy_b_commits(*args: Any) -> dict:
        found = original_read(*args)
        if threading.current_thread().name == "A" and not b_ran.is_set():
            b_ran.set()
            b = Copy("B", stock_reserve, saga_id=saga_id, order_id=order_id, lines=lines)
            b.start()
            assert b.outcome() == {"reserved": [{"sku": sku, "quantity": 2}]}
        return found

    monkeypatch.setattr(services, "_reserve_at_once", at_once)
    monkeypatch.setattr(services, "processed_results", read_then_copy_b_commits)
    a = Copy("A", stock_reserve, saga_id=saga_id, order_id=order_id, lines=lines)
    a.start()

    assert a.outcome() == {"reserved": [{"sku": sku, "quantity": 2}]}
    assert shelf(sku)[:2] == (5, 2)  # held once
    assert Reservation.objects.filter(saga_id=saga_id).count() == 1


def test_racing_releases_give_the_stock_back_once(sku: str) -> None:
    other = f"{sku}-B"
    make_product(sku, on_hand=5, price=str(PRICE))
    make_product(other, on_hand=3, price=str(PRICE))
    saga_id = uuid.uuid4()
    stock_reserve(saga_id=saga_id, order_id=uuid.uuid4(), lines=[(sku, 2, PRICE), (other, 3, PRICE)])
    assert (shelf(sku), shelf(other)) == ((5, 2, 0), (3, 3, 0))

    copies = [Copy(f"release-{i}", stock_release, saga_id=saga_id) for i in range(4)]
    for copy in copies:
        copy.start()
    released = [copy.outcome() for copy in copies]

    expected = {"released": [{"sku": sku, "quantity": 2}, {"sku": other, "quantity": 3}]}
    assert released == [expected] * 4
    assert (shelf(sku), shelf(other)) == ((5, 0, 0), (3, 0, 0))


def test_a_release_with_nothing_held_leaves_a_tombstone_the_reservation_meets(sku: str) -> None:
    make_product(sku, on_hand=5, price=str(PRICE))
    saga_id = uuid.uuid4()
    assert stock_release(saga_id=saga_id) == {"released": []}
    with pytest.raises(StepRefused, match="already released"):
        stock_reserve(saga_id=saga_id, order_id=uuid.uuid4(), lines=[(sku, 1, PRICE)])
    assert shelf(sku) == (5, 0, 0)


# The `compensating_order` fixture: makes one, returns (order, saga id).
MakeOrder = Callable[..., tuple[Order, uuid.UUID]]


@pytest.fixture
def compensating_order() -> Iterator[MakeOrder]:
    """Makes a pending order whose saga is compensating (the coordinator has decided),
    written as order_place and saga_begin_compensation leave them, without publishing
    anything (its steps are not written: nothing for the sweeper to re-publish).

    The sagas it made end compensated after the test: no chain runs them here, and later
    tests wait for every saga of the session to end."""
    made: list[uuid.UUID] = []

    def make(*, cancelled: bool = False) -> tuple[Order, uuid.UUID]:
        order = Order.objects.create(
            user_id=0, email="race@example.com", payment_token="tok_visa", total=PRICE, currency="EUR"
        )
        if cancelled:
            Order.objects.filter(id=order.id).update(cancel_requested_at=order.created_at)
        saga = saga_new(definition=PLACE_ORDER, order_id=order.id, context={})
        saga.outcome = "cancelled" if cancelled else "failed"
        saga.status = "compensating"
        saga.save(using="orders")
        made.append(saga.id)
        return order, saga.id

    yield make
    SagaInstance.objects.filter(id__in=made).update(status=SagaStatus.COMPENSATED)


def test_racing_copies_of_the_fail_step_fail_the_order_once(
    compensating_order: MakeOrder,
) -> None:
    order, saga_id = compensating_order()
    copies = [Copy(f"fail-{i}", order_fail, order_id=order.id, saga_id=saga_id, reason=f"reason {i}") for i in range(4)]
    for copy in copies:
        copy.start()
    assert [copy.outcome() for copy in copies] == [{"outcome": "failed"}] * 4
    order.refresh_from_db()
    assert order.status == Order.Status.FAILED
    assert order.failure_reason in {f"reason {i}" for i in range(4)}


def test_a_cancelled_order_ends_cancelled(compensating_order: MakeOrder) -> None:
    order, saga_id = compensating_order(cancelled=True)
    assert order_fail(order_id=order.id, saga_id=saga_id, reason="as you asked") == {"outcome": "cancelled"}
    assert order_fail(order_id=order.id, saga_id=saga_id, reason="again") == {"outcome": "cancelled"}
    order.refresh_from_db()
    assert (order.status, order.failure_reason) == (Order.Status.CANCELLED, "as you asked")


def test_the_fail_step_waits_for_a_confirmation_committing_and_then_refuses(
    compensating_order: MakeOrder,
) -> None:
    order, saga_id = compensating_order()

    def confirm() -> None:
        locked = Order.objects.select_for_update().get(id=order.id)
        locked.status = Order.Status.CONFIRMED
        locked.save(update_fields=["status", "updated_at"])

    failing = Copy("fail", order_fail, order_id=order.id, saga_id=saga_id, reason="declined")
    behind("orders", confirm, failing, what="the fail step waiting on the order's row")

    with pytest.raises(StepRefused, match="is confirmed; it cannot fail"):
        failing.outcome()
    order.refresh_from_db()
    assert (order.status, order.failure_reason) == (Order.Status.CONFIRMED, "")


def test_the_fail_step_refuses_an_order_whose_saga_is_not_compensating(
    compensating_order: MakeOrder,
) -> None:
    order, saga_id = compensating_order()
    SagaInstance.objects.filter(id=saga_id).update(outcome="", status="running")
    with pytest.raises(StepRefused, match="is not compensating"):
        order_fail(order_id=order.id, saga_id=saga_id, reason="forged")
    order.refresh_from_db()
    assert order.status == Order.Status.PENDING
