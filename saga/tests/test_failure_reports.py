"""A failure report moves a saga only with the coordinator's authority for that very task.

`saga.step_failed` reads the failure the result backend holds for the task id it names,
and a failure before the pivot compensates the saga. Anyone who can send a task by name
(a Flower login, a foothold on the broker) could otherwise fail any running order: name
a stored failure of their own, or another saga's declined charge (a decline is final, so
the refund would be skipped while this saga's charge goes through).
"""

import pytest

from common.exceptions import InvalidMessage
from common.signing import failure_report_mint
from orders_project.celery import app
from saga.engine import task_id_for
from saga.models import SagaStatus
from saga.tasks import step_failed

from .coordinator import FORWARD, PaymentDeclined, fail, saga_row, snapshot, start, statuses, timeline

pytestmark = pytest.mark.django_db(databases=["orders", "default"])


def report(task_id: str, saga_id: object, step: str, **kwargs: object) -> BaseException | None:
    """Run `saga.step_failed` in this process (`apply`: no broker, no worker) as the saga
    worker would; the error it failed with, if any."""
    result = step_failed.apply(args=(task_id,), kwargs={"saga_id": str(saga_id), "step": step, **kwargs})
    return result.result if result.failed() else None


def test_reports_without_the_coordinators_authority_for_that_task_move_nothing() -> None:
    declined = start()
    fail(declined, "charge_payment", PaymentDeclined("declined"), timeline=timeline(declined, ["reserve_inventory"]))
    victim = start()
    before = snapshot(victim)
    elsewhere = task_id_for(declined.id, "charge_payment", 0)  # a real decline, of another saga
    own = task_id_for(victim.id, "charge_payment", 0)
    app.backend.store_result(own, TypeError("a failure someone else made under this id"), "FAILURE")

    refusals = [
        report(elsewhere, victim.id, "charge_payment"),
        report(own, victim.id, "charge_payment"),
        report(own, victim.id, "charge_payment", authority="forged"),
        # The authority for the other saga's report, and this saga's for another step.
        report(
            elsewhere,
            victim.id,
            "charge_payment",
            authority=failure_report_mint(saga_id=declined.id, step="charge_payment", task_id=elsewhere),
        ),
        report(
            own,
            victim.id,
            "charge_payment",
            authority=failure_report_mint(saga_id=victim.id, step="reserve_inventory", task_id=own),
        ),
    ]

    assert all(isinstance(error, InvalidMessage) for error in refusals), refusals
    assert snapshot(victim) == before
    assert saga_row(victim).status == SagaStatus.RUNNING


def test_the_errbacks_own_report_is_acted_on() -> None:
    saga = start()
    task_id = task_id_for(saga.id, "reserve_inventory", 0)
    app.backend.store_result(task_id, PaymentDeclined("out of stock"), "FAILURE")
    authority = failure_report_mint(saga_id=saga.id, step="reserve_inventory", task_id=task_id)

    assert report(task_id, saga.id, "reserve_inventory", authority=authority) is None

    row = saga_row(saga)
    assert (row.status, row.failure_step, row.failure_type) == (
        SagaStatus.COMPENSATING,
        "reserve_inventory",
        "PaymentDeclined",
    )
    assert statuses(saga, FORWARD)[0] == "failed"
