"""The coordinator's state machine where people and the sweeper act on it: a customer's
cancel and an operator's "compensate now" racing the pivot and late reports, an operator's
retry racing a late success, retry by fingerprint, and the recovery sweeper's branches.

The orders and default test databases, and the real test broker that the sweeper asks
(no worker consumes it here: every queue it reads is empty, or holds only what a test
put there); no workers. What would be published is read from the orders connection's
on-commit callbacks (saga.tests.coordinator).
"""

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from common.exceptions import StepRefused, TransientError
from orders.models import Order
from orders.saga import PLACE_ORDER
from orders_project.celery import app
from saga import broker_latch, recovery
from saga.broker_latch import BrokerLatch
from saga.definition import SagaDefinition, Step, register
from saga.models import SagaAuditEntry, SagaInstance, SagaStatus, SagaStep, StepStatus
from saga.operator import OPERATOR_COMPENSATED, saga_compensate, saga_retry, saga_retry_by_fingerprint
from saga.progress import saga_reports_drain, saga_step_succeeded
from saga.publish import saga_begin_compensation, saga_publish
from saga.recovery import SENT_AT
from saga.settlement import saga_settlements_send
from saga.sweeper import saga_sweep

from .coordinator import (
    COMPENSATION,
    COMPENSATION_TASKS,
    FORWARD,
    PaymentDeclined,
    fail,
    ids,
    pivot,
    published,
    report,
    rows,
    saga_row,
    sealed_record,
    snapshot,
    start,
    statuses,
    store_record,
    timeline,
)

pytestmark = pytest.mark.django_db(databases=["orders", "default"])
FORWARD_TASKS = [step.task for step in PLACE_ORDER.steps]


@pytest.fixture(autouse=True)
def fleet(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The workers' answer to the sweeper's broadcast (no worker runs here): by default one
    worker answers and holds none of the steps asked about."""
    answer: dict[str, Any] = {"held": set(), "answered": 1}
    monkeypatch.setattr(
        recovery, "held_task_ids", lambda task_ids, **_: (answer["held"] & set(task_ids), answer["answered"])
    )
    return answer


def with_order(saga: SagaInstance, status: str = Order.Status.PENDING) -> Order:
    """The saga's order row: the pivot guard (orders.services) locks and reads it."""
    return Order.objects.using("orders").create(
        id=saga.order_id, user_id=1, email="c@example.com", payment_token="tok_visa", total=Decimal("20.00"),
        currency="EUR", status=status,
    )  # fmt: skip


def cancel(saga: SagaInstance) -> None:
    """What the customer's cancel does to the saga (orders.services.order_cancel)."""
    with transaction.atomic(using="orders"):
        locked = saga_row(saga)
        saga_begin_compensation(
            locked, outcome="cancelled", failure_step=locked.current_step, failure_type="Cancelled", reason="asked"
        )


def stall(saga: SagaInstance, step: str, *, republished: int = 0, ago: int = 60) -> None:
    """`step` is running and `ago` seconds past its deadline, re-published `republished` times."""
    now = timezone.now()
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name=step).update(
        status=StepStatus.RUNNING,
        republished=republished,
        queued_at=now - timedelta(seconds=ago + 100),
        deadline_at=now - timedelta(seconds=ago),
    )


# --- Cancels racing the pivot and reports -----------------------------------------------


def test_a_cancel_before_the_pivot_wins_and_late_reports_only_fill_in_the_timeline(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        cancel(saga)
        # The confirm commits after the cancel: the saga may no longer pass its pivot.
        assert not pivot(saga)
        # The reserve had committed before the cancel; its report arrives now.
        steps = timeline(saga, ["reserve_inventory"], generation=0)
        saga_step_succeeded(saga_id=saga.id, step_name="reserve_inventory", result=report(saga, steps))
        fail(saga, "confirm_order", StepRefused("the order is being cancelled"), generation=0)

    row = saga_row(saga)
    assert (row.status, row.outcome, row.generation, row.current_step) == (
        SagaStatus.COMPENSATING,
        "cancelled",
        1,
        "refund_payment",
    )
    assert row.pivot_committed_at is None
    assert statuses(saga, FORWARD) == ["succeeded", "unknown", "refused", "pending"]
    assert statuses(saga, COMPENSATION) == ["running", "pending", "pending", "pending"]
    # Only the cancel published: its compensations, once.
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 1), strict=True))]


def test_after_the_pivot_neither_a_cancel_nor_an_operator_can_compensate(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    with_order(saga, Order.Status.CONFIRMED)
    done = snapshot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        with pytest.raises(ValueError, match="past its pivot"), transaction.atomic(using="orders"):
            saga_begin_compensation(
                saga_row(saga), outcome="cancelled", failure_step="", failure_type="Cancelled", reason="x"
            )
        audit = saga_compensate(saga_id=saga.id, user=None)

    assert (audit.outcome, audit.status_before, audit.status_after) == ("refused", "running", "running")
    assert "past its pivot" in audit.detail
    assert snapshot(saga) == done
    assert published(callbacks) == []


def test_an_operator_compensates_a_running_saga_once_and_the_pivot_then_refuses(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    with_order(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        first = saga_compensate(saga_id=saga.id, user=None)
        second = saga_compensate(saga_id=saga.id, user=None)  # a second click
        assert not pivot(saga)

    assert (first.outcome, first.status_before, first.status_after) == ("done", "running", "compensating")
    assert (second.outcome, second.detail) == ("refused", "it is already compensating")
    row = saga_row(saga)
    assert (row.status, row.outcome, row.failure_type, row.failure_step, row.generation) == (
        SagaStatus.COMPENSATING,
        "failed",
        OPERATOR_COMPENSATED,
        "reserve_inventory",
        1,
    )
    assert statuses(saga, FORWARD) == ["unknown", "unknown", "unknown", "pending"]
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 1), strict=True))]
    assert list(SagaAuditEntry.objects.using("orders").filter(saga_id=saga.id).values_list("outcome", flat=True)) == [
        "refused",
        "done",
    ]


def test_an_operator_may_compensate_a_pivot_that_never_reported_but_not_a_later_step() -> None:
    saga = start()
    with_order(saga)
    saga_step_succeeded(
        saga_id=saga.id,
        step_name="charge_payment",
        result=report(saga, timeline(saga, ["reserve_inventory", "charge_payment"])),
    )
    stall(saga, "confirm_order", republished=settings.SAGA_REPUBLISH_BUDGET)
    saga_sweep()
    assert (saga_row(saga).status, saga_row(saga).failure_step) == (SagaStatus.NEEDS_ATTENTION, "confirm_order")

    assert saga_compensate(saga_id=saga.id, user=None).outcome == "done"
    assert (saga_row(saga).status, saga_row(saga).generation) == (SagaStatus.COMPENSATING, 1)

    later = start()
    with_order(later)
    assert pivot(later)
    fail(later, "notify_customer", TransientError("SMTP down"))
    audit = saga_compensate(saga_id=later.id, user=None)
    assert (audit.outcome, audit.detail) == (
        "refused",
        "it is past its pivot (confirm_order committed): retry it instead",
    )


# --- Operator retry -----------------------------------------------------------------------


def needing_attention_at_notify() -> SagaInstance:
    saga = start()
    assert pivot(saga)
    fail(saga, "notify_customer", TransientError("SMTP down"))
    return saga


def test_a_retry_races_the_late_success_of_the_step_it_re_publishes(django_capture_on_commit_callbacks) -> None:
    saga = needing_attention_at_notify()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        audit = saga_retry(saga_id=saga.id, user=None)

    assert (audit.outcome, audit.status_before, audit.status_after) == ("done", "needs_attention", "running")
    assert audit.failure_fingerprint == "TransientError @ notify_customer"
    row, notify = saga_row(saga), rows(saga)["notify_customer"]
    assert (row.status, row.generation, row.current_step) == (SagaStatus.RUNNING, 1, "notify_customer")
    # A fresh budget: the retry is its first re-publish, with twice the step's deadline.
    assert (notify.status, notify.republished, notify.attempts) == (StepStatus.RUNNING, 1, 2)
    assert (notify.celery_task_id, notify.finished_at) == (f"{saga.id}-notify_customer-g1", None)
    assert notify.deadline_at > timezone.now() + timedelta(seconds=PLACE_ORDER.steps[-1].deadline_seconds)
    assert published(callbacks) == [[("notifications.notify", f"{saga.id}-notify_customer-g1")]]

    # The copy that had failed for good succeeds after all, and so does the retry's: both
    # records are drained, the saga completes once.
    for generation, worker in ((0, "late@host"), (1, "retry@host")):
        steps = timeline(saga, FORWARD, generation=generation, worker=worker)
        record = sealed_record(saga, "notify_customer", steps, generation=generation)
        store_record(saga, "notify_customer", record, generation=generation)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_reports_drain()
        again = saga_retry(saga_id=saga.id, user=None)

    row = saga_row(saga)
    assert (row.status, row.current_step, row.generation) == (SagaStatus.COMPLETED, "", 1)
    assert rows(saga)["notify_customer"].status == StepStatus.SUCCEEDED
    assert (again.outcome, again.detail) == ("refused", "it completed: nothing to retry")
    assert published(callbacks) == []


def test_a_repeated_errback_of_the_failure_a_retry_superseded_changes_nothing(
    django_capture_on_commit_callbacks,
) -> None:
    """The errback of the failure that stopped the saga fires again after the operator's
    retry (errbacks may repeat): the re-published copy is in flight and reports for itself.

    Before the fix the old copy's failure failed the step again under the old task id and
    flagged the saga once more, and the sweeper no longer watched the retried copy."""
    saga = needing_attention_at_notify()
    saga_retry(saga_id=saga.id, user=None)
    done = snapshot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "notify_customer", TransientError("SMTP down"), generation=0)

    assert snapshot(saga) == done
    notify = rows(saga)["notify_customer"]
    assert (saga_row(saga).status, notify.status) == (SagaStatus.RUNNING, StepStatus.RUNNING)
    assert notify.celery_task_id == f"{saga.id}-notify_customer-g1" and notify.deadline_at is not None
    assert published(callbacks) == []

    # The retried copy's own failure still counts.
    fail(saga, "notify_customer", TransientError("SMTP still down"), generation=1)
    assert (saga_row(saga).status, saga_row(saga).failure_reason) == (SagaStatus.NEEDS_ATTENTION, "SMTP still down")


def test_a_late_success_before_the_retry_completes_the_saga_and_the_retry_is_refused() -> None:
    saga = needing_attention_at_notify()
    steps = timeline(saga, FORWARD, worker="late@host")
    store_record(saga, "notify_customer", sealed_record(saga, "notify_customer", steps))
    saga_reports_drain()
    done = snapshot(saga)
    assert done[0]["status"] == SagaStatus.COMPLETED

    audit = saga_retry(saga_id=saga.id, user=None)
    assert (audit.outcome, audit.status_before, audit.status_after) == ("refused", "completed", "completed")
    assert snapshot(saga) == done


def test_a_retry_of_a_failed_compensation_finishes_compensating(django_capture_on_commit_callbacks) -> None:
    saga = start()
    fail(saga, "charge_payment", PaymentDeclined("declined"), timeline=timeline(saga, ["reserve_inventory"]))
    fail(saga, "release_inventory", TransientError("down"), timeline=[])  # no refund after a decline
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        audit = saga_retry(saga_id=saga.id, user=None)

    assert (audit.outcome, audit.status_after) == ("done", "compensating")
    row = saga_row(saga)
    assert (row.status, row.generation, row.current_step) == (SagaStatus.COMPENSATING, 2, "release_inventory")
    assert statuses(saga, COMPENSATION) == ["not_needed", "running", "pending", "pending"]
    rest = COMPENSATION[1:]
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS[1:], ids(saga, rest, 2), strict=True))]


def test_what_a_retry_does_by_state() -> None:
    running = start()
    assert "not stuck" in saga_retry(saga_id=running.id, user=None).detail
    stall(running, "reserve_inventory")
    assert saga_retry(saga_id=running.id, user=None).detail.startswith("re-published reserve_inventory")
    assert (saga_row(running).generation, rows(running)["reserve_inventory"].republished) == (1, 1)

    compensated = start()
    fail(compensated, "reserve_inventory", PaymentDeclined("x"), timeline=[])
    saga_step_succeeded(
        saga_id=compensated.id,
        step_name="notify_failure",
        result=report(compensated, timeline(compensated, COMPENSATION)),
    )
    audit = saga_retry(saga_id=compensated.id, user=None)
    assert (audit.outcome, audit.status_after) == ("refused", "compensated")

    # Flagged at the confirm, which has since succeeded, as has every step after it.
    finished = needing_attention_at_notify()
    SagaStep.objects.using("orders").filter(saga_id=finished.id).update(status=StepStatus.SUCCEEDED)
    audit = saga_retry(saga_id=finished.id, user=None)
    assert (audit.outcome, audit.status_after) == ("done", "completed")
    row = saga_row(finished)
    assert (row.current_step, row.generation) == ("", 0) and row.finished_at is not None


def test_a_retry_by_fingerprint_takes_the_oldest_matching_sagas_up_to_its_limit() -> None:
    sagas = [needing_attention_at_notify() for _ in range(3)]
    other = start()  # flagged for another failure
    assert pivot(other)
    fail(other, "notify_customer", StepRefused("no address"))
    entries, remaining = saga_retry_by_fingerprint(
        fingerprints=["TransientError @ notify_customer"], user=None, limit=2
    )
    assert [entry.saga_id for entry in entries] == [saga.id for saga in sagas[:2]]
    assert remaining == 1
    assert [saga_row(saga).status for saga in sagas] == ["running", "running", "needs_attention"]
    assert saga_row(other).status == SagaStatus.NEEDS_ATTENTION
    assert not SagaAuditEntry.objects.using("orders").filter(saga_id=other.id).exists()


# --- The sweeper ------------------------------------------------------------------------


def test_the_sweeper_re_publishes_a_lost_chain_as_a_new_generation(django_capture_on_commit_callbacks) -> None:
    saga = start()
    stall(saga, "reserve_inventory")
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        now = timezone.now()
        saga_sweep(now=now)

    row, reserve = saga_row(saga), rows(saga)["reserve_inventory"]
    assert (row.status, row.generation, row.current_step) == (SagaStatus.RUNNING, 1, "reserve_inventory")
    assert (reserve.status, reserve.republished, reserve.attempts, reserve.queued_at) == ("running", 1, 1, now)
    segment = sum(step.deadline_seconds for step in PLACE_ORDER.steps[:3])  # up to the pivot
    assert reserve.deadline_at == now + timedelta(seconds=segment * 2)
    assert published(callbacks) == [list(zip(FORWARD_TASKS, ids(saga, FORWARD, 1), strict=True))]


def quiet(saga: SagaInstance, step: str, *, ago: float = 30) -> datetime:
    """`step` is running, queued `ago` seconds ago and still inside its deadline; its deadline."""
    now = timezone.now()
    deadline = now + timedelta(seconds=60)
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name=step).update(
        status=StepStatus.RUNNING, queued_at=now - timedelta(seconds=ago), deadline_at=deadline
    )
    return deadline


@pytest.fixture
def queues(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The oldest message of each queue, as the sweeper reads it (default: every queue empty)."""
    heads: dict[str, float] = {}
    monkeypatch.setattr(
        recovery, "queue_heads", lambda names, **_: {name: heads.get(name, recovery.EMPTY) for name in names}
    )
    return heads


def test_a_quiet_step_whose_message_is_nowhere_is_judged_at_the_next_sweep(
    queues: dict[str, float], django_capture_on_commit_callbacks
) -> None:
    """A lost message used to cost its segment's deadline (three steps' SAGA_STEP_TIMEOUT,
    a minute and a half for a new order); quiet for SAGA_QUIET_SECONDS and found nowhere,
    its step is due at once, and the next sweep's look decides, as at any deadline."""
    saga = start()
    quiet(saga, "reserve_inventory", ago=settings.SAGA_QUIET_SECONDS + 1)
    now = timezone.now()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep(now=now) == {"quiet_due": 1}
    reserve = rows(saga)["reserve_inventory"]
    assert (reserve.status, reserve.deadline_at, reserve.republished) == (StepStatus.RUNNING, now, 0)
    assert published(callbacks) == []  # one look calls nothing lost

    later = now + timedelta(seconds=settings.SAGA_SWEEP_INTERVAL)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep(now=later).get("republished") == 1
    assert published(callbacks) == [list(zip(FORWARD_TASKS, ids(saga, FORWARD, 1), strict=True))]


def test_a_busy_coordinator_queue_hides_a_quiet_chain_only_behind_its_failure_report(queues: dict[str, float]) -> None:
    """The coordinator's queue is seldom empty (a sweep every interval, every failure
    report): it can hold this chain's failure report only if one of its steps failed."""
    from django_celery_results.models import TaskResult

    saga = start()
    quiet(saga, "reserve_inventory")
    queues["saga"] = time.time() - 20
    assert saga_sweep() == {"quiet_due": 1}

    deadline = quiet(saga, "reserve_inventory")
    reserve = ids(saga, ["reserve_inventory"], 0)[0]
    TaskResult.objects.using("default").create(task_id=reserve, status="FAILURE")  # stored now, after the head
    assert saga_sweep() == {}
    assert rows(saga)["reserve_inventory"].deadline_at == deadline


def test_a_stalled_chain_waits_behind_the_coordinators_queue_only_for_its_failure_report(
    queues: dict[str, float], django_capture_on_commit_callbacks
) -> None:
    """Past its deadline, as before the deadline: a busy coordinator queue hid every stalled
    chain, and a lost message waited for a sweep that found that queue empty."""
    from django_celery_results.models import TaskResult

    def stalled_within_its_patience() -> None:
        now = timezone.now()
        SagaStep.objects.using("orders").filter(saga_id=saga.id, name="reserve_inventory").update(
            status=StepStatus.RUNNING, queued_at=now - timedelta(seconds=40), deadline_at=now - timedelta(seconds=1)
        )

    saga = start()
    stalled_within_its_patience()
    queues["saga"] = time.time() - 20
    reserve = ids(saga, ["reserve_inventory"], 0)[0]
    TaskResult.objects.using("default").create(task_id=reserve, status="FAILURE")  # its report may be behind
    assert saga_sweep().get("waiting") == 1

    TaskResult.objects.using("default").filter(task_id=reserve).delete()  # no failure: no report
    stalled_within_its_patience()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep().get("republished") == 1
    assert published(callbacks) == [list(zip(FORWARD_TASKS, ids(saga, FORWARD, 1), strict=True))]


@pytest.mark.parametrize(
    "where",
    ["held by a worker", "retrying", "behind a backlog", "behind a RabbitMQ queue", "unheard", "not quiet yet", "off"],
)
def test_a_quiet_step_keeps_its_deadline_unless_its_message_is_nowhere(
    where: str, queues: dict[str, float], fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    saga = start()
    deadline = quiet(saga, "reserve_inventory", ago=5 if where == "not quiet yet" else 30)
    asked: list[list[str]] = []
    answer = recovery.held_task_ids
    monkeypatch.setattr(recovery, "held_task_ids", lambda task_ids, **kw: asked.append(task_ids) or answer(task_ids))
    if where == "held by a worker":
        fleet["held"] = {ids(saga, ["charge_payment"], 0)[0]}  # the chain got as far as the charge
    elif where == "retrying":
        # Its worker holds the next attempt for a countdown, which no broadcast shows
        # (saga.sweeper._outcomes_stored): the stored retry says so.
        from django_celery_results.models import TaskResult

        TaskResult.objects.using("default").create(task_id=ids(saga, ["charge_payment"], 0)[0], status="RETRY")
    elif where == "behind a backlog":
        queues["payments"] = time.time() - 60  # older than the chain: its message may wait there
    elif where == "behind a RabbitMQ queue":
        queues["orders"] = recovery.UNKNOWN  # not empty, and its head cannot be read
    elif where == "unheard":
        fleet["answered"] = 0
    elif where == "off":
        monkeypatch.setattr(settings, "SAGA_QUIET_SECONDS", 0)

    assert saga_sweep() == {}

    assert rows(saga)["reserve_inventory"].deadline_at == deadline
    # Only a chain no queue can be holding is asked about: a backlog costs no broadcast.
    assert bool(asked) == (where in ("held by a worker", "unheard"))


def test_a_quiet_look_does_not_cut_short_a_re_publish_made_while_it_asked_the_workers(
    queues: dict[str, float], fleet: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look writes without the saga's lock, after a broadcast of up to a second: an
    operator's retry or another sweep may have re-published the step meanwhile, with a
    deadline of its own, which the look's "due now" must leave alone."""
    saga = start()
    quiet(saga, "reserve_inventory", ago=settings.SAGA_QUIET_SECONDS + 1)
    republished = timezone.now() + timedelta(seconds=120)
    answer = recovery.held_task_ids

    def asked_while_re_published(task_ids: list[str], **kw: Any) -> tuple[set[str], int]:
        SagaStep.objects.using("orders").filter(saga_id=saga.id, name="reserve_inventory").update(
            queued_at=timezone.now(), deadline_at=republished, republished=1
        )
        return answer(task_ids, **kw)

    monkeypatch.setattr(recovery, "held_task_ids", asked_while_re_published)

    assert saga_sweep() == {}
    assert rows(saga)["reserve_inventory"].deadline_at == republished


@pytest.mark.parametrize("status", ["RETRY", "FAILURE"])
def test_a_result_dated_in_the_future_does_not_hold_a_lost_step_off_the_sweeper(
    status: str, queues: dict[str, float], fleet: dict[str, Any], django_capture_on_commit_callbacks
) -> None:
    """Every worker's database role writes the result backend. A retry stored for a chain's
    task says a worker holds its next attempt; a failure, that its report may be on its
    way: either held the lost step off the sweeper until its time, which such a role could
    set to next year."""
    from django_celery_results.models import TaskResult

    saga = start()
    quiet(saga, "reserve_inventory", ago=settings.SAGA_QUIET_SECONDS + 1)
    charge = ids(saga, ["charge_payment"], 0)[0]
    TaskResult.objects.using("default").create(task_id=charge, status=status)
    # date_done is set on save (auto_now): dated as a role's own UPDATE would date it.
    TaskResult.objects.using("default").filter(task_id=charge).update(date_done=timezone.now() + timedelta(days=365))
    if status == "FAILURE":
        queues["saga"] = time.time() - 20  # a backlog a report sent then could be behind
    now = timezone.now()
    assert saga_sweep(now=now) == {"quiet_due": 1}
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        later = now + timedelta(seconds=settings.SAGA_SWEEP_INTERVAL)
        assert saga_sweep(now=later).get("republished") == 1
    assert published(callbacks) == [list(zip(FORWARD_TASKS, ids(saga, FORWARD, 1), strict=True))]


def broker_away(*_: Any, **__: Any) -> None:
    raise BrokerUnavailable("connection refused")


@pytest.mark.parametrize("publisher", ["a new order", "a compensation"])
def test_a_chain_whose_publish_failed_is_due_at_the_next_sweep(
    publisher: str, django_capture_on_commit_callbacks, caplog: pytest.LogCaptureFixture
) -> None:
    """The transaction committed and the publish after it failed (the broker away past the
    publish's retries): the step is due at once, so the next sweep finds its message gone
    and publishes again, instead of the step waiting out its segment's deadline (a minute
    and a half for a new order's first segment)."""
    with pytest.MonkeyPatch.context() as broker, django_capture_on_commit_callbacks(using="orders", execute=True):
        broker.setattr(app, "send_task", broker_away)
        saga = start()
        if publisher == "a compensation":
            fail(saga, "reserve_inventory", PaymentDeclined("x"), timeline=[])
    # One line per publish, as a broker outage fails every one: no traceback. The first
    # failed; a compensation's, after it, was not tried (saga.broker_latch).
    lines = [r for r in caplog.records if r.name == "saga.publish"]
    assert [r.levelname for r in lines] == ["WARNING"] + (["INFO"] if publisher == "a compensation" else [])
    assert all(r.exc_info is None for r in lines)
    assert "connection refused" in lines[0].getMessage()
    row = saga_row(saga)
    first, plan, tasks = (
        ("refund_payment", COMPENSATION, COMPENSATION_TASKS)
        if publisher == "a compensation"
        else ("reserve_inventory", FORWARD, FORWARD_TASKS)
    )
    step = rows(saga)[first]
    assert (step.status, step.celery_task_id) == (StepStatus.RUNNING, ids(saga, [first], row.generation)[0])
    assert step.deadline_at <= timezone.now()

    wait_until(lambda: not broker_latch.LATCH.down())  # its probe hears the test broker
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep().get("republished") == 1
    assert published(callbacks) == [list(zip(tasks, ids(saga, plan, row.generation + 1), strict=True))]


def test_a_re_publish_whose_publish_failed_keeps_its_paced_deadline(django_capture_on_commit_callbacks) -> None:
    """A broker that fails every publish must not spend a step's re-publish budget in as
    many sweeps (and fail an order that never started): a failed re-publish keeps the
    doubled deadline its budget is paced by."""
    saga = start()
    stall(saga, "reserve_inventory")
    with pytest.MonkeyPatch.context() as broker, django_capture_on_commit_callbacks(using="orders", execute=True):
        broker.setattr(app, "send_task", broker_away)
        now = timezone.now()
        saga_sweep(now=now)
    reserve = rows(saga)["reserve_inventory"]
    segment = sum(step.deadline_seconds for step in PLACE_ORDER.steps[:3])  # up to the pivot
    assert (reserve.status, reserve.republished) == (StepStatus.RUNNING, 1)
    assert reserve.deadline_at == now + timedelta(seconds=segment * 2)


class Broker:
    """A broker that is away until `back()`: publishes raise, as the probe does."""

    def __init__(self) -> None:
        self.away, self.published = True, 0

    def send_task(self, *_: Any, **__: Any) -> None:
        if self.away:
            raise BrokerUnavailable("connection refused")
        self.published += 1

    def probe(self) -> None:
        if self.away:
            raise BrokerUnavailable("connection refused")


def wait_until(condition: Any, *, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_after_a_publish_found_the_broker_away_no_publish_is_tried_until_it_answers(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first publish of an outage spends Celery's retries (6 to 36 s; in the web, a
    request held that long) and fails; the publishes after it are not tried at all, each
    left to the sweeper as a failed one is, until a probe hears the broker again. Then
    publishing resumes by itself."""
    broker = Broker()
    latch = BrokerLatch(broker.probe, lambda: 3600.0)  # its probe waits: nothing changes meanwhile
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    monkeypatch.setattr(app, "send_task", broker.send_task)
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        first = start()
    assert latch.down()
    broker.away = False  # it would take a publish now, but none is tried before the probe hears it
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        second = start()
    assert broker.published == 0
    for saga in (first, second):
        reserve = rows(saga)["reserve_inventory"]
        assert (reserve.status, reserve.republished) == (StepStatus.RUNNING, 0)
        assert reserve.deadline_at <= timezone.now()  # due at the next sweep
    # The failed publish may have reached the broker; the skipped one cannot have.
    assert not rows(first)["reserve_inventory"].never_sent
    assert rows(second)["reserve_inventory"].never_sent
    assert any(
        r.levelname == "INFO" and f"saga {second.id}: the broker is away" in r.getMessage() for r in caplog.records
    )

    probed = BrokerLatch(broker.probe, lambda: 0.05)
    probed.failed(BrokerUnavailable("connection refused"))
    monkeypatch.setattr(broker_latch, "LATCH", probed)
    wait_until(lambda: not probed.down())
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        start()
    assert broker.published == 1


def test_a_publish_riding_out_an_outage_puts_the_latch_down_meanwhile_and_up_once_through(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    """Celery's retries of one publish ride out a short restart (saga.publish._RideOut).
    Once it has failed for SAGA_BROKER_PROBE_SECONDS, the other publishes of the process
    are skipped instead of waiting as long; when it goes through, they resume."""
    settings.SAGA_BROKER_PROBE_SECONDS = 0
    latch = BrokerLatch(Broker().probe, lambda: 3600.0)  # only the publish can bring it up
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    meanwhile = []

    def send_task(*_: Any, **options: Any) -> None:
        options["retry_policy"]["errback"](ConnectionRefusedError(111, "refused"), 0.2)  # as kombu, per retry
        meanwhile.append(latch.down())
        # ... and the retry went through.

    monkeypatch.setattr(app, "send_task", send_task)
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        saga = start()
    assert meanwhile == [True]
    assert not latch.down()
    reserve = rows(saga)["reserve_inventory"]
    assert reserve.deadline_at > timezone.now()  # published: nothing for the sweeper


def test_a_publish_gives_up_after_its_ride_out_and_leaves_the_chain_to_the_sweeper(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Not Celery's whole policy (36 s after a connection broke, a web thread held as
    long): SAGA_PUBLISH_RIDE_OUT_SECONDS, then the step is due at the next sweep."""
    settings.SAGA_PUBLISH_RIDE_OUT_SECONDS = 0.1
    latch = BrokerLatch(Broker().probe, lambda: 3600.0)
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    retries = []

    def send_task(*_: Any, **options: Any) -> None:
        for _attempt in range(20):  # the policy's retries, each refused
            retries.append(_attempt)
            options["retry_policy"]["errback"](ConnectionRefusedError(111, "refused"), 2.0)

    monkeypatch.setattr(app, "send_task", send_task)
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        saga = start()
    assert retries == [0]  # the first retry would end past the ride-out: given up there
    assert latch.down()
    reserve = rows(saga)["reserve_inventory"]
    assert (reserve.status, reserve.never_sent) == (StepStatus.RUNNING, False)
    assert reserve.deadline_at <= timezone.now()
    failed = "publishing its next steps failed (OperationalError: no broker for"
    assert any(failed in r.getMessage() for r in caplog.records)


def test_a_sweep_stops_re_publishing_once_a_re_publish_found_the_broker_away(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each re-publish after that would only be skipped, spending its step's budget."""
    from saga import sweeper

    latch = BrokerLatch(Broker().probe, lambda: 3600.0)
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    recover = sweeper._recover_stalled

    def recover_and_find_the_broker_away(*args: Any) -> str:
        outcome = recover(*args)
        latch.failed(BrokerUnavailable("connection refused"))  # as its publish, on commit, would
        return outcome

    monkeypatch.setattr(sweeper, "_recover_stalled", recover_and_find_the_broker_away)
    first, second = start(), start()
    stall(first, "reserve_inventory", ago=61)  # the older deadline: the sweep's first
    stall(second, "reserve_inventory", ago=60)
    with django_capture_on_commit_callbacks(using="orders"):
        assert saga_sweep() == {"republished": 1, "broker_away": 1}
    assert [rows(saga)["reserve_inventory"].republished for saga in (first, second)] == [1, 0]


def test_a_chain_never_sent_is_published_by_the_next_sweep_without_asking_where_it_is(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chain whose publish was skipped (saga.broker_latch) can be nowhere: the sweep
    publishes it again at once, and asks neither the broker nor the workers. Right after a
    broker restart that look can say "waiting" for seconds (a queue's old head)."""
    broker = Broker()
    latch = BrokerLatch(broker.probe, lambda: 0.05)
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    saga = start()
    latch.failed(BrokerUnavailable("connection refused"))
    with django_capture_on_commit_callbacks(using="orders", execute=True):
        saga_publish(saga)  # as the web, whose latch is down
    assert rows(saga)["reserve_inventory"].never_sent
    broker.away = False
    wait_until(lambda: not latch.down())

    def no_look(**_: Any) -> None:
        raise AssertionError("the sweep asked where a chain that was never sent is")

    monkeypatch.setattr(recovery, "broker_view", no_look)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep() == {"republished": 1}
    reserve = rows(saga)["reserve_inventory"]
    assert (reserve.status, reserve.republished, reserve.never_sent) == (StepStatus.RUNNING, 1, False)
    assert published(callbacks) == [list(zip(FORWARD_TASKS, ids(saga, FORWARD, 1), strict=True))]


def test_a_sweep_in_a_process_that_found_the_broker_away_re_publishes_nothing(
    django_capture_on_commit_callbacks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its re-publishes would only be skipped, each spending a step's budget: the sweep
    records what committed and leaves stalled steps and settlements for a sweep that can
    publish."""
    broker = Broker()
    latch = BrokerLatch(broker.probe, lambda: 0.05)
    monkeypatch.setattr(broker_latch, "LATCH", latch)
    stalled, settling = start(), start()
    stall(stalled, "reserve_inventory")
    assert pivot(settling)
    latch.failed(BrokerUnavailable("connection refused"))
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep() == {"broker_away": 1}
    assert callbacks == []
    assert rows(stalled)["reserve_inventory"].republished == 0
    assert saga_row(settling).settlement_sent_at is None

    broker.away = False
    wait_until(lambda: not latch.down())
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        done = saga_sweep()
    assert (done.get("republished"), done.get("settlement_sent:record_sales")) == (1, 1)
    assert rows(stalled)["reserve_inventory"].republished == 1


def test_a_settlement_whose_publish_failed_is_sent_again_by_the_next_sweep(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    with pytest.MonkeyPatch.context() as broker, django_capture_on_commit_callbacks(using="orders", execute=True):
        broker.setattr(app, "send_task", broker_away)
        assert saga_settlements_send() == {"settlement_sent:record_sales": 1}
    assert saga_row(saga).settlement_sent_at is None  # the claim is given back

    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_settlements_send() == {"settlement_sent:record_sales": 1}
    assert saga_row(saga).settlement_sent_at is not None
    assert len(callbacks) == 1


def test_past_its_budget_a_step_before_the_pivot_fails_and_the_saga_compensates(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    stall(saga, "reserve_inventory", republished=settings.SAGA_REPUBLISH_BUDGET)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_sweep()

    row, reserve = saga_row(saga), rows(saga)["reserve_inventory"]
    assert (row.status, row.failure_type, row.generation) == (SagaStatus.COMPENSATING, "StepTimedOut", 1)
    assert (reserve.status, reserve.deadline_at) == (StepStatus.FAILED, None)
    budget = settings.SAGA_REPUBLISH_BUDGET
    assert reserve.last_error == f"StepTimedOut: reserve_inventory did not report back after {budget} re-publishes"
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 1), strict=True))]


@pytest.mark.parametrize("where", ["pivot", "after the pivot", "compensation"])
def test_past_its_budget_a_step_that_cannot_be_undone_needs_attention(
    where: str, django_capture_on_commit_callbacks
) -> None:
    saga = start()
    if where == "pivot":
        steps = timeline(saga, ["reserve_inventory", "charge_payment"])
        saga_step_succeeded(saga_id=saga.id, step_name="charge_payment", result=report(saga, steps))
        step = "confirm_order"
    elif where == "after the pivot":
        assert pivot(saga)
        step = "notify_customer"
    else:
        fail(saga, "reserve_inventory", PaymentDeclined("x"), timeline=[])
        step = "refund_payment"
    stall(saga, step, republished=settings.SAGA_REPUBLISH_BUDGET)
    generation = saga_row(saga).generation
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_sweep()

    row = saga_row(saga)
    assert (row.status, row.failure_step, row.failure_type) == (SagaStatus.NEEDS_ATTENTION, step, "StepTimedOut")
    assert row.generation == generation
    assert rows(saga)[step].status == StepStatus.FAILED
    assert published(callbacks) == []


def test_the_sweeper_re_publishes_a_lost_compensation_from_where_it_stalled(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    fail(saga, "reserve_inventory", PaymentDeclined("x"), timeline=[])
    stall(saga, "refund_payment")
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_sweep()
    assert (saga_row(saga).status, saga_row(saga).generation) == (SagaStatus.COMPENSATING, 2)
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 2), strict=True))]


def test_a_look_no_worker_answered_re_publishes_nothing_until_the_steps_patience_ends(
    fleet: dict[str, Any], django_capture_on_commit_callbacks
) -> None:
    """Not even the saga worker running the sweep answered: the broadcast failed (a broker
    restart leaves a connection deaf for seconds), not every worker. Whether one holds the
    step is unknown, so its budget is not spent on a guess, unless the control channel
    stays deaf past the step's patience."""
    saga = start()
    stall(saga, "reserve_inventory")
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name="reserve_inventory").update(
        queued_at=timezone.now() - timedelta(seconds=1)  # well inside its patience
    )
    fleet["answered"] = 0
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep().get("unanswered") == 1
    reserve = rows(saga)["reserve_inventory"]
    assert (reserve.republished, saga_row(saga).generation) == (0, 0)
    assert published(callbacks) == []

    fleet["answered"] = 1  # the next look hears the workers: nobody holds it, it was lost
    later = timezone.now() + timedelta(hours=1)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep(now=later).get("republished") == 1
    assert rows(saga)["reserve_inventory"].republished == 1

    # Deaf for good: past its patience, re-published all the same.
    deaf = start()
    stall(deaf, "reserve_inventory")
    SagaStep.objects.using("orders").filter(saga_id=deaf.id, name="reserve_inventory").update(
        queued_at=timezone.now() - timedelta(hours=1)
    )
    fleet["answered"] = 0
    assert saga_sweep().get("republished") == 1
    assert rows(deaf)["reserve_inventory"].republished == 1


def test_a_stalled_step_before_a_committed_pivot_is_not_re_published(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    stall(saga, "charge_payment")  # a row left running by an old coordinator
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_sweep()
    charge = rows(saga)["charge_payment"]
    assert (charge.status, charge.deadline_at, saga_row(saga).generation) == (StepStatus.UNKNOWN, None, 0)
    assert published(callbacks) == []


def test_a_chain_whose_record_waits_is_recorded_not_re_published(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    stall(saga, "notify_customer")
    store_record(saga, "notify_customer", sealed_record(saga, "notify_customer", timeline(saga, FORWARD)))
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        done = saga_sweep()
    assert done.get("recorded", 0) >= 1 and not done.get("republished")
    assert (saga_row(saga).status, saga_row(saga).generation) == (SagaStatus.COMPLETED, 0)
    assert published(callbacks) == []


def test_a_stalled_step_of_a_saga_that_no_longer_runs_is_skipped() -> None:
    saga = needing_attention_at_notify()
    stall(saga, "notify_customer")  # as an old coordinator left it
    done = snapshot(saga)
    assert saga_sweep().get("skipped", 0) >= 1
    assert snapshot(saga) == done


# A saga whose steps go to a queue no worker consumes, so a test can put a message there.
QUEUE = "coordinator_unit_test"
BACKLOGGED = register(
    SagaDefinition(
        name=QUEUE,
        steps=(
            Step("hold", f"{QUEUE}.hold", compensation=Step("unhold", f"{QUEUE}.unhold"), timeout=10),
            Step("confirm", f"{QUEUE}.confirm", timeout=10),
        ),
        pivot="confirm",
    )
)


@pytest.fixture
def backlog() -> Iterator[None]:
    """An older message at the head of the saga's queue, in the real broker."""
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        client.delete(QUEUE)
        client.lpush(QUEUE, '{"headers": {"%s": %f}}' % (SENT_AT, timezone.now().timestamp() - 600))  # noqa: UP031
        try:
            yield
        finally:
            client.delete(QUEUE)


@pytest.mark.usefixtures("backlog")
def test_a_chain_that_may_wait_behind_a_backlog_gets_time_not_a_re_publish(django_capture_on_commit_callbacks) -> None:
    saga = start(BACKLOGGED)
    now = timezone.now()
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name="hold").update(
        queued_at=now - timedelta(seconds=25), deadline_at=now - timedelta(seconds=5)
    )
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep(now=now).get("waiting", 0) >= 1
    hold = rows(saga)["hold"]
    assert (hold.status, hold.republished, saga_row(saga).generation) == (StepStatus.RUNNING, 0, 0)
    assert now < hold.deadline_at <= now + timedelta(seconds=20)
    assert published(callbacks) == []

    # Past its patience (SAGA_BACKLOG_PATIENCE segments since it was queued): re-published.
    SagaStep.objects.using("orders").filter(saga_id=saga.id, name="hold").update(
        queued_at=now - timedelta(seconds=600), deadline_at=now - timedelta(seconds=5)
    )
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_sweep(now=now).get("republished", 0) >= 1
    assert published(callbacks) == [
        [(f"{QUEUE}.hold", f"{saga.id}-hold-g1"), (f"{QUEUE}.confirm", f"{saga.id}-confirm-g1")]
    ]
