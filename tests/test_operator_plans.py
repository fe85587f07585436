"""What retry and compensate-now would do to a saga in each state (saga.operator), read
from the saga store alone. The sagas are written and rolled back in one transaction:
nothing is published and no worker ever sees them (the end-to-end paths are in
tests/test_admin.py)."""

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from orders.saga import PLACE_ORDER
from saga.models import SagaInstance, SagaStep
from saga.operator import saga_compensate_check, saga_retry_check

FORWARD = [step.name for step in PLACE_ORDER.steps]
COMPENSATION = [step.name for step in PLACE_ORDER.compensation_steps()]


class _Rollback(Exception):
    pass


@pytest.fixture
def rolled_back(db_access: None) -> Iterator[None]:
    try:
        with transaction.atomic(using="orders"):
            yield
            raise _Rollback
    except _Rollback:
        pass


def saga(
    status: str, *, current: str = "", failed: str = "", steps: dict[str, str], deadline: int | None = None
) -> SagaInstance:
    """A place-order saga with the given step statuses (missing steps: pending)."""
    instance = SagaInstance.objects.create(
        definition=PLACE_ORDER.name,
        order_id=uuid.uuid4(),
        status=status,
        current_step=current,
        failure_step=failed,
        failure_type="TransientError" if failed else "",
    )
    phases = [("forward", FORWARD)] + ([("compensation", COMPENSATION)] if set(steps) & set(COMPENSATION) else [])
    for phase, names in phases:
        for position, name in enumerate(names):
            SagaStep.objects.create(
                saga=instance,
                phase=phase,
                position=position,
                name=name,
                task_name=name,
                status=steps.get(name, "pending"),
                deadline_at=timezone.now() + timedelta(seconds=deadline) if name == current and deadline else None,
            )
    return instance


DONE_UNTIL_NOTIFY = {"reserve_inventory": "succeeded", "charge_payment": "succeeded", "confirm_order": "succeeded"}


@pytest.mark.usefixtures("rolled_back")
class TestRetry:
    def test_needs_attention_after_the_pivot_resumes_from_the_failed_step(self) -> None:
        plan = saga_retry_check(
            saga(
                "needs_attention",
                current="notify_customer",
                failed="notify_customer",
                steps={**DONE_UNTIL_NOTIFY, "notify_customer": "failed"},
            )
        )
        assert (plan.step.name, plan.finish) == ("notify_customer", "")
        assert plan.detail.startswith("resumed from notify_customer, which failed (TransientError)")

    def test_a_failed_compensation_resumes_the_compensations(self) -> None:
        steps = {"reserve_inventory": "succeeded", "charge_payment": "cancelled", "refund_payment": "failed"}
        plan = saga_retry_check(saga("needs_attention", current="refund_payment", failed="refund_payment", steps=steps))
        assert (plan.step.name, plan.step.phase) == ("refund_payment", "compensation")

    def test_a_step_that_succeeded_late_is_not_run_again(self) -> None:
        steps = {"reserve_inventory": "succeeded", "refund_payment": "succeeded"}
        plan = saga_retry_check(saga("needs_attention", current="refund_payment", failed="refund_payment", steps=steps))
        assert plan.step.name == "release_inventory"
        assert "has succeeded since" in plan.detail
        everything = {**DONE_UNTIL_NOTIFY, "notify_customer": "succeeded"}
        plan = saga_retry_check(saga("needs_attention", failed="notify_customer", steps=everything))
        assert (plan.step, plan.finish) == (None, "completed")

    def test_a_running_saga_is_retried_only_when_stuck(self) -> None:
        steps = {"reserve_inventory": "running"}
        fine = saga_retry_check(saga("running", current="reserve_inventory", steps=steps, deadline=30))
        stuck = saga_retry_check(saga("running", current="reserve_inventory", steps=steps, deadline=-1))
        assert not fine.possible
        assert "not stuck" in fine.detail
        assert stuck.step.name == "reserve_inventory"

    @pytest.mark.parametrize(
        ("status", "reason"),
        [("completed", "it completed"), ("compensated", "tombstones refuse them")],
    )
    def test_finished_sagas_are_not_retried(self, status: str, reason: str) -> None:
        plan = saga_retry_check(saga(status, steps=DONE_UNTIL_NOTIFY))
        assert not plan.possible
        assert reason in plan.detail


@pytest.mark.usefixtures("rolled_back")
class TestCompensate:
    def test_a_running_saga_before_its_pivot_may_be_compensated(self) -> None:
        steps = {"reserve_inventory": "succeeded", "charge_payment": "running"}
        assert saga_compensate_check(saga("running", current="charge_payment", steps=steps)) is None

    def test_a_saga_that_needs_attention_at_its_pivot_may_be_compensated(self) -> None:
        steps = {"reserve_inventory": "succeeded", "charge_payment": "succeeded", "confirm_order": "failed"}
        assert saga_compensate_check(saga("needs_attention", failed="confirm_order", steps=steps)) is None

    @pytest.mark.parametrize(
        ("status", "current", "failed", "reason"),
        [
            ("running", "notify_customer", "", "past its pivot"),
            ("needs_attention", "notify_customer", "notify_customer", "retry it instead"),
            ("needs_attention", "refund_payment", "refund_payment", "already compensating"),
            ("compensating", "refund_payment", "", "already compensating"),
            ("compensated", "", "", "already compensated"),
            ("completed", "", "", "already completed"),
        ],
    )
    def test_what_cannot_be_compensated(self, status: str, current: str, failed: str, reason: str) -> None:
        steps = {**DONE_UNTIL_NOTIFY, current: "running"} if current else DONE_UNTIL_NOTIFY
        assert reason in saga_compensate_check(saga(status, current=current, failed=failed, steps=steps))
