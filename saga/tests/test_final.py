"""What a saga finished or committed is final, in PostgreSQL, for every role (saga migration
0013, orders migration 0004): the coordinator decides from the store, so a store that could
be turned back would let whoever writes it have a confirmed, paid order refunded."""

from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from orders.models import Order
from saga.models import SagaInstance, SagaStatus

from .coordinator import start

pytestmark = pytest.mark.django_db(databases=["orders"])


def refused(**changes: object) -> str:
    saga = start()
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.COMPLETED, pivot_committed_at=timezone.now())
    with pytest.raises(IntegrityError) as error, transaction.atomic(using="orders"):
        SagaInstance.objects.filter(id=saga.id).update(**changes)
    return str(error.value)


def test_a_completed_saga_cannot_be_turned_back_to_running_before_its_pivot() -> None:
    # The forged store the sweeper would have compensated (refund included).
    assert "what a saga finished or committed is final" in refused(
        status=SagaStatus.RUNNING, pivot_committed_at=None, finished_at=None
    )
    assert "is final" in refused(status=SagaStatus.NEEDS_ATTENTION)
    assert "is final" in refused(pivot_committed_at=None)


def test_a_saga_moves_on_as_usual_until_it_finishes() -> None:
    saga = start()
    now = timezone.now()
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.COMPENSATING)
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.NEEDS_ATTENTION)
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.RUNNING, pivot_committed_at=now)
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.COMPLETED, settled_at=now)
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPLETED


@pytest.mark.parametrize("final", [Order.Status.CONFIRMED, Order.Status.FAILED, Order.Status.CANCELLED])
def test_an_orders_outcome_is_final(final: str) -> None:
    order = Order.objects.create(user_id=1, email="f@example.com", payment_token="tok_visa", total=Decimal("1.00"))
    Order.objects.filter(id=order.id).update(status=final)
    for other in {Order.Status.PENDING, Order.Status.CONFIRMED, Order.Status.FAILED} - {final}:
        with pytest.raises(IntegrityError, match="is final"), transaction.atomic(using="orders"):
            Order.objects.filter(id=order.id).update(status=other)


def test_a_saga_written_back_whole_leaves_its_pivot_to_the_pivot() -> None:
    from saga import store

    saga = start()
    pivot = timezone.now()
    SagaInstance.objects.filter(id=saga.id).update(pivot_committed_at=pivot)
    with transaction.atomic(using="orders"):
        row = store.lock_saga(saga.id)
        # The time as a lossy round trip would bring it back (milliseconds only).
        row.pivot_committed_at = pivot.replace(microsecond=pivot.microsecond // 1000 * 1000 + 1)
        row.current_step = "notify_customer"
        store.save(row, [])
    saved = SagaInstance.objects.get(id=saga.id)
    assert (saved.pivot_committed_at, saved.current_step) == (pivot, "notify_customer")
