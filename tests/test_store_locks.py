"""The coordinator's locked read of a saga and its steps, against a holder of the saga's
lock that changes a step and commits while the read waits: the read sees the steps as
the holder left them (saga.store.lock_sagas_with_steps).

Real concurrency on the orders database: the holder and the reader are threads, each with
its own connection; the test waits until PostgreSQL reports the reader waiting on the lock.
"""

import threading
import uuid
from typing import Any

import pytest
from django.db import connections, transaction

from devstack.topology import wait_for
from orders.saga import PLACE_ORDER
from saga import store
from saga.models import SagaInstance, SagaStep, StepStatus
from saga.publish import saga_start

pytestmark = [pytest.mark.integration]


def waiting_on_a_lock(marker: str) -> bool:
    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{marker}%"],
        )
        return bool(cursor.fetchone()[0])


@pytest.mark.parametrize("skip_locked", [False, True])
def test_a_read_that_waited_for_the_lock_sees_the_steps_its_holder_wrote(db_access: None, skip_locked: bool) -> None:
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=uuid.uuid4(), context={"items": []})
    held, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def holder() -> None:
        try:
            with transaction.atomic(using="orders"):
                store.lock_saga(saga.id)
                # An operator's retry, say: the step re-published, its row written.
                SagaStep.objects.using("orders").filter(saga_id=saga.id, name="reserve_inventory").update(
                    status=StepStatus.FAILED, celery_task_id=f"{saga.id}-reserve_inventory-g3"
                )
                held.set()
                assert release.wait(30)
        finally:
            connections.close_all()

    def reader() -> None:
        try:
            with transaction.atomic(using="orders"):
                found = store.lock_sagas_with_steps([saga.id], skip_locked=skip_locked)
                seen["found"] = {
                    i: {n: (s.status, s.celery_task_id) for n, s in steps.items()} for i, (_, steps) in found.items()
                }
        finally:
            connections.close_all()

    try:
        first = threading.Thread(target=holder, daemon=True)
        first.start()
        assert held.wait(30)
        second = threading.Thread(target=reader, daemon=True)
        second.start()
        if not skip_locked:
            wait_for(lambda: waiting_on_a_lock(str(SagaInstance._meta.db_table)), timeout=30, what="the read to wait")
        else:
            second.join(30)  # a saga someone holds is left out, not waited for
        release.set()
        first.join(30)
        second.join(30)
        assert not first.is_alive() and not second.is_alive()
        if skip_locked:
            assert seen["found"] == {}
        else:
            assert seen["found"][saga.id]["reserve_inventory"] == ("failed", f"{saga.id}-reserve_inventory-g3")
    finally:
        release.set()
        # Never published, and left running it would be an unfinished saga to every later
        # test that waits for the earlier ones' (both brokers' passes share the databases).
        SagaInstance.objects.using("orders").filter(id=saga.id).delete()
