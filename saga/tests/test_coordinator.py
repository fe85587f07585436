"""The coordinator's state machine, branch by branch, as reports reach it: success reports
(duplicate, out of order, from an earlier generation, for a saga that has ended), failure
reports (before and after the pivot, of a compensation, forged, repeated) and the drain of
chain records. The orders and default test databases only, no workers; what would be
published is read from the orders connection's on-commit callbacks (saga.tests.coordinator).

Operator actions, cancels and the sweeper: test_coordinator_operators.py.
"""

import logging
import uuid
from datetime import timedelta

import pytest
from celery import states
from celery.app.task import Context
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone
from django_celery_results.models import TaskResult

from common.exceptions import InvalidMessage, StepFailed, StepRefused, TransientError
from common.signing import failure_seal
from common.steps import stored_args_repr
from orders.saga import PLACE_ORDER
from orders_project.celery import app
from saga.definition import SagaDefinition, Step, register
from saga.engine import task_id_for
from saga.failure import saga_step_failed
from saga.models import SagaInstance, SagaStatus, StepPhase, StepStatus
from saga.operator import saga_compensate_check, saga_retry
from saga.progress import saga_pivot_commit, saga_reports_drain, saga_step_succeeded
from saga.publish import saga_begin_compensation, saga_republish_from

from .coordinator import (
    COMPENSATION,
    COMPENSATION_TASKS,
    FORWARD,
    PaymentDeclined,
    entry,
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


# --- Success reports --------------------------------------------------------------------


def test_the_chains_record_completes_the_saga_and_a_duplicate_changes_nothing(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    steps = timeline(saga, FORWARD)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_step_succeeded(saga_id=saga.id, step_name="notify_customer", result=report(saga, steps))
        done = snapshot(saga)
        saga_step_succeeded(saga_id=saga.id, step_name="notify_customer", result=report(saga, steps))

    row = saga_row(saga)
    assert (row.status, row.current_step, row.generation) == (SagaStatus.COMPLETED, "", 0)
    # When its last step finished, not when the coordinator heard of it.
    assert row.finished_at.isoformat() == steps[-1]["finished_at"]
    for meta, step in zip(steps, rows(saga).values(), strict=True):
        assert (step.status, step.attempts, step.worker, step.deadline_at) == ("succeeded", 1, "w@host", None)
        assert (step.started_at.isoformat(), step.finished_at.isoformat()) == (meta["started_at"], meta["finished_at"])
        assert step.celery_task_id == meta["task_id"]
    assert snapshot(saga) == done  # the duplicate wrote nothing, not even updated_at
    assert published(callbacks) == []  # the chain publishes its own next steps


def test_a_report_of_a_step_moves_the_saga_to_the_next_and_the_next_segment_gets_its_deadline() -> None:
    """A per-step report (saga.step_succeeded, still registered for old messages)."""
    saga = start()
    steps = timeline(saga, ["reserve_inventory"])
    before = timezone.now()
    saga_step_succeeded(saga_id=saga.id, step_name="reserve_inventory", result=report(saga, steps))

    row, step = saga_row(saga), rows(saga)
    assert (row.status, row.current_step, row.generation) == (SagaStatus.RUNNING, "charge_payment", 0)
    assert step["reserve_inventory"].status == StepStatus.SUCCEEDED
    charge = step["charge_payment"]
    assert (charge.status, charge.celery_task_id) == (StepStatus.RUNNING, f"{saga.id}-charge_payment-g0")
    # Queued when the step before it finished; its deadline covers the segment to the pivot.
    assert charge.queued_at == step["reserve_inventory"].finished_at
    # The segment's deadline: the charge's and the confirm's (the pivot records itself).
    expected = PLACE_ORDER.steps[1].deadline_seconds + PLACE_ORDER.steps[2].deadline_seconds
    assert before + timedelta(seconds=expected) <= charge.deadline_at <= timezone.now() + timedelta(seconds=expected)
    assert statuses(saga, ["confirm_order", "notify_customer"]) == ["pending", "pending"]


def test_a_late_report_of_an_earlier_step_never_rewinds_the_saga() -> None:
    saga = start()
    # The pivot committed without the charge's record (its entry was lost): unknown.
    assert pivot(saga, steps=["reserve_inventory"])
    assert statuses(saga, FORWARD) == ["succeeded", "unknown", "succeeded", "running"]

    # The charge's own report arrives now, out of order.
    saga_step_succeeded(saga_id=saga.id, step_name="charge_payment", result=report(saga, []))
    row = saga_row(saga)
    assert (row.status, row.current_step) == (SagaStatus.RUNNING, "notify_customer")
    assert statuses(saga, FORWARD) == ["succeeded", "succeeded", "succeeded", "running"]

    # And the reserve's, again: a duplicate.
    done = snapshot(saga)
    steps = timeline(saga, ["reserve_inventory"])
    saga_step_succeeded(saga_id=saga.id, step_name="reserve_inventory", result=report(saga, steps))
    assert snapshot(saga) == done


def test_a_record_from_an_earlier_generation_completes_the_saga_once(django_capture_on_commit_callbacks) -> None:
    """The sweeper re-published a slow chain (generation 1); the first chain finishes after
    all, then the second: both records are drained, the first one counts."""
    saga = start()
    with transaction.atomic(using="orders"):
        locked = saga_row(saga)
        saga_republish_from(locked, rows(saga)["reserve_inventory"])
    assert saga_row(saga).generation == 1

    first = timeline(saga, FORWARD, generation=0, worker="old@host")
    second = timeline(saga, FORWARD, generation=1, worker="new@host")
    old = store_record(saga, "notify_customer", sealed_record(saga, "notify_customer", first), generation=0)
    new = store_record(
        saga, "notify_customer", sealed_record(saga, "notify_customer", second, generation=1), generation=1
    )
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        assert saga_reports_drain() >= 2

    row = saga_row(saga)
    assert (row.status, row.generation) == (SagaStatus.COMPLETED, 1)
    # Whichever record came first is what the timeline shows; the other was a duplicate.
    workers = {step.worker for step in rows(saga).values()}
    assert len(workers) == 1 and workers <= {"old@host", "new@host"}
    assert not TaskResult.objects.filter(task_id__in=[old, new]).exists()
    assert published(callbacks) == []


def test_a_record_of_a_saga_that_has_ended_changes_nothing_and_is_deleted() -> None:
    saga = start()
    steps = timeline(saga, FORWARD)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_customer", result=report(saga, steps))
    done = snapshot(saga)

    late = store_record(saga, "notify_customer", sealed_record(saga, "notify_customer", steps))
    assert saga_reports_drain() == 0
    assert snapshot(saga) == done
    # Whoever published it may still be reading it: it stays a while...
    assert TaskResult.objects.filter(task_id=late).exists()
    # ...and goes once stale (it used to stay until the result backend's expiry).
    TaskResult.objects.filter(task_id=late).update(date_done=timezone.now() - timedelta(minutes=2))
    assert saga_reports_drain() == 0
    assert snapshot(saga) == done
    assert not TaskResult.objects.filter(task_id=late).exists()


def test_the_drain_reads_records_in_batches_whatever_is_in_flight() -> None:
    """Each read takes at most a batch of records, oldest first, and the drain reads again
    while a read comes back full: three sagas' records with a batch of two."""
    sagas = [start() for _ in range(3)]
    for saga in sagas:
        store_record(saga, "notify_customer", sealed_record(saga, "notify_customer", timeline(saga, FORWARD)))
    idle = start()  # in flight, with no record: costs the drain nothing
    assert saga_reports_drain(batch=2) == 3
    assert [saga_row(saga).status for saga in sagas] == [SagaStatus.COMPLETED] * 3
    assert saga_row(idle).status == SagaStatus.RUNNING
    assert not TaskResult.objects.filter(status="SUCCESS").exists()


def test_a_success_report_for_a_compensated_saga_records_the_step_and_moves_nothing(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    fail(saga, "reserve_inventory", StepFailed("out of stock"), timeline=[])
    undo = timeline(saga, COMPENSATION, generation=1)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_failure", result=report(saga, undo))
    ended = saga_row(saga)
    assert ended.status == SagaStatus.COMPENSATED

    # A late forward report (a duplicate that committed before its tombstone, since undone).
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        steps = timeline(saga, ["reserve_inventory", "charge_payment"], generation=0)
        saga_step_succeeded(saga_id=saga.id, step_name="charge_payment", result=report(saga, steps))

    row = saga_row(saga)
    assert (row.status, row.finished_at, row.current_step) == (SagaStatus.COMPENSATED, ended.finished_at, "")
    # The charge ran: the timeline says so. The reserve's failure stays what it was.
    assert statuses(saga, FORWARD) == ["failed", "succeeded", "pending", "pending"]
    assert published(callbacks) == []


def test_a_report_for_an_unknown_saga_or_step_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    saga = start()
    done = snapshot(saga)
    saga_step_succeeded(saga_id=uuid.uuid4(), step_name="notify_customer", result={})
    saga_step_succeeded(saga_id=saga.id, step_name="no_such_step", result={})
    assert snapshot(saga) == done
    assert "succeeded for unknown saga" in caplog.text and "has no step no_such_step" in caplog.text


# --- The pivot --------------------------------------------------------------------------


def test_the_pivot_records_once_and_only_for_its_own_running_saga() -> None:
    saga = start()
    with transaction.atomic(using="orders"):
        assert not saga_pivot_commit(saga_id=saga.id, order_id=uuid.uuid4())
    assert saga_row(saga).pivot_committed_at is None

    assert pivot(saga, amount="20.00")
    row = saga_row(saga)
    assert row.pivot_committed_at is not None and row.context["amount"] == "20.00"
    assert (row.current_step, rows(saga)["confirm_order"].result) == ("notify_customer", {"amount": "20.00"})
    done = snapshot(saga)
    assert pivot(saga)  # a redelivered confirm: already recorded
    assert snapshot(saga) == done


# --- Failure reports --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "error"),
    [
        *((step, StepFailed("no stock left")) for step in ["reserve_inventory", "charge_payment", "confirm_order"]),
        # A failure its step does not record as final (Step.final_failures) undoes everything.
        *((step, PaymentDeclined("card declined")) for step in ["reserve_inventory", "confirm_order"]),
    ],
)
def test_a_failure_up_to_the_pivot_compensates_every_step_before_it(
    failing: str, error: Exception, django_capture_on_commit_callbacks
) -> None:
    saga = start()
    before = FORWARD[: FORWARD.index(failing)]
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        task_id = fail(
            saga,
            failing,
            error,
            timeline=timeline(saga, before),
            attempt={"attempt": 2, "worker": "p@host"},
        )

    row = saga_row(saga)
    assert (row.status, row.outcome, row.generation, row.current_step) == (
        SagaStatus.COMPENSATING,
        "failed",
        1,
        "refund_payment",
    )
    assert (row.failure_step, row.failure_type, row.failure_reason) == (failing, type(error).__name__, str(error))
    # The customer gets the fixed sentence for the kind, not the raw error.
    assert row.context["outcome"] == "failed" and str(error) not in row.context["failure_reason"]
    assert row.pivot_committed_at is None and row.finished_at is None
    step = rows(saga)
    failed = step[failing]
    assert (failed.status, failed.last_error, failed.celery_task_id) == (
        StepStatus.FAILED,
        f"{type(error).__name__}: {error}",
        task_id,
    )
    assert (failed.attempts, failed.worker, failed.deadline_at) == (2, "p@host", None)
    assert failed.finished_at is not None
    assert [step[name].status for name in before] == ["succeeded"] * len(before)
    assert step["notify_customer"].status == StepStatus.PENDING
    # Every compensation runs, newest first, as generation 1: its first step has the
    # deadline of the whole chain, the rest wait.
    assert statuses(saga, COMPENSATION) == ["running", "pending", "pending", "pending"]
    refund = step["refund_payment"]
    assert (refund.phase, refund.celery_task_id) == (StepPhase.COMPENSATION, f"{saga.id}-refund_payment-g1")
    assert refund.deadline_at > timezone.now()
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 1), strict=True))]


def test_after_a_declined_card_the_refund_is_not_needed_and_the_chain_starts_at_the_release(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), timeline=timeline(saga, ["reserve_inventory"]))
    row = saga_row(saga)
    assert (row.status, row.generation, row.current_step) == (SagaStatus.COMPENSATING, 1, "release_inventory")
    assert (row.failure_step, row.failure_type) == ("charge_payment", "PaymentDeclined")
    # The charge recorded its decline under its key, final at the provider: nothing to
    # refund, and no copy of it will charge. The refund is shown not needed, not run.
    assert statuses(saga, COMPENSATION) == ["not_needed", "running", "pending", "pending"]
    refund = rows(saga)["refund_payment"]
    assert (refund.attempts, refund.started_at, refund.deadline_at, refund.celery_task_id) == (0, None, None, "")
    assert refund.finished_at is not None
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS[1:], ids(saga, COMPENSATION[1:], 1), strict=True))]

    # The rest of the compensation reports; the saga ends compensated with the refund not run.
    undo = timeline(saga, COMPENSATION[1:], generation=1)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_failure", result=report(saga, undo))
    assert saga_row(saga).status == SagaStatus.COMPENSATED
    assert statuses(saga, COMPENSATION) == ["not_needed", "succeeded", "succeeded", "succeeded"]


@pytest.mark.parametrize("seal", ["none", "of another type"])
def test_a_decline_its_step_did_not_seal_does_not_skip_the_refund(
    seal: str, django_capture_on_commit_callbacks
) -> None:
    """Every worker's database role writes the result backend: one could rewrite a charge's
    ambiguous failure (a provider timeout, which may have charged) as a decline, which
    would skip the refund. Only a decline the charge itself sealed is final."""
    saga = start()
    task_id = task_id_for(saga.id, "charge_payment", 0)
    sealed = (
        None
        if seal == "none"
        else failure_seal(saga_id=saga.id, step="charge_payment", task_id=task_id, error_type="TransientError")
    )
    stored = Context(id=task_id, argsrepr=stored_args_repr({"saga_id": str(saga.id)}, sealed_failure=sealed))
    app.backend.store_result(task_id, PaymentDeclined("card declined"), states.FAILURE, request=stored)

    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_step_failed(saga_id=saga.id, step_name="charge_payment", task_id=task_id, timeline=[])

    row = saga_row(saga)
    assert (row.status, row.current_step, row.failure_type) == (
        SagaStatus.COMPENSATING,
        "refund_payment",
        "PaymentDeclined",
    )
    assert statuses(saga, COMPENSATION) == ["running", "pending", "pending", "pending"]
    assert published(callbacks) == [list(zip(COMPENSATION_TASKS, ids(saga, COMPENSATION, 1), strict=True))]


@pytest.mark.parametrize("step", ["reserve_inventory", "charge_payment"])
def test_a_stored_timeline_cannot_make_a_failure_read_as_its_own_steps_success(
    step: str, django_capture_on_commit_callbacks
) -> None:
    """Every worker's database role writes the result backend, and a stored failure's
    timeline is unsealed. One that named the failing step itself (or a later one) as
    succeeded made the failure a "duplicate failed after success": no compensation, the
    step's deadline cleared, stock held and a charge kept. Its outputs could also replace
    what the saga holds, such as the address the failure notice goes to."""
    saga = start(email="customer@example.com")
    task_id = task_id_for(saga.id, step, 0)
    forged = [
        {
            "task_id": task_id_for(saga.id, name, 0),
            "started_at": timezone.now().isoformat(),
            "finished_at": timezone.now().isoformat(),
            "attempt": 1,
            "worker": "w@h",
            "output": {"email": "attacker@example.net"},
        }
        for name in FORWARD
    ]
    stored = Context(id=task_id, argsrepr=stored_args_repr({"saga_id": str(saga.id), "_steps": forged}))
    app.backend.store_result(task_id, TransientError("provider unavailable"), states.FAILURE, request=stored)

    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_step_failed(saga_id=saga.id, step_name=step, task_id=task_id)

    row = saga_row(saga)
    assert (row.status, row.failure_step) == (SagaStatus.COMPENSATING, step)
    assert row.context["email"] == "customer@example.com"
    assert rows(saga)[step].status == StepStatus.FAILED
    assert statuses(saga, FORWARD[FORWARD.index(step) + 1 :]) == ["pending"] * (len(FORWARD) - FORWARD.index(step) - 1)
    assert published(callbacks)


class Final(Exception):
    """A failure its step records as final (Step.final_failures)."""


# A saga whose only compensation a final failure makes pointless, with nothing after it.
NOTHING_AFTER = register(
    SagaDefinition(
        name="final_then_nothing",
        steps=(
            Step("pay", "payments.charge", compensation=Step("refund", "payments.refund"), final_failures=("Final",)),
            Step("confirm", "orders.confirm"),
        ),
        pivot="confirm",
    )
)


def test_when_no_compensation_is_needed_and_nothing_runs_after_them_the_saga_ends_compensated(
    django_capture_on_commit_callbacks,
) -> None:
    saga = start(NOTHING_AFTER)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "pay", Final("no"), timeline=[])
    row = saga_row(saga)
    assert (row.status, row.current_step, row.failure_type) == (SagaStatus.COMPENSATED, "", "Final")
    assert row.finished_at is not None
    assert statuses(saga, ["refund"]) == ["not_needed"]
    assert published(callbacks) == []


def test_a_failed_step_shows_the_times_of_the_attempt_that_failed() -> None:
    saga = start()
    started = timezone.now() - timedelta(seconds=3)
    ended = started + timedelta(milliseconds=250)
    attempt = {"attempt": 1, "worker": "p@host", "started_at": started.isoformat(), "finished_at": ended.isoformat()}
    fail(saga, "charge_payment", StepFailed("x"), timeline=timeline(saga, ["reserve_inventory"]), attempt=attempt)
    failed = rows(saga)["charge_payment"]
    assert (failed.status, failed.attempts, failed.started_at, failed.finished_at) == ("failed", 1, started, ended)

    # Times that are not a worker's (no zone, reversed, not a time) are not shown: the
    # step failed when the coordinator read its report.
    for started_at, finished_at in [
        (started.replace(tzinfo=None).isoformat(), ended.isoformat()),
        (ended.isoformat(), started.isoformat()),
        ("2026-13-45T99:00:00+00:00", ended.isoformat()),
        (None, ended.isoformat()),
    ]:
        other = start()
        before = timezone.now()
        attempt = {"attempt": 1, "started_at": started_at, "finished_at": finished_at}
        fail(other, "charge_payment", StepFailed("x"), timeline=timeline(other, ["reserve_inventory"]), attempt=attempt)
        failed = rows(other)["charge_payment"]
        assert failed.started_at is None and failed.finished_at >= before, (started_at, finished_at)


def test_a_repeated_errback_for_the_same_failure_changes_nothing(django_capture_on_commit_callbacks) -> None:
    saga = start()
    fail(saga, "charge_payment", PaymentDeclined("card declined"), timeline=timeline(saga, ["reserve_inventory"]))
    done = snapshot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), generation=0)
    assert snapshot(saga) == done
    assert published(callbacks) == []


def test_a_redelivered_report_publishes_its_compensation_again_in_the_same_generation(
    django_capture_on_commit_callbacks,
) -> None:
    """The saga worker that decided may have died between its commit and its publish: the
    report the broker delivers again publishes the same chain (same task ids), and changes
    nothing else. Not once the sweeper re-published it, nor once the chain has reported."""
    saga = start()
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), timeline=timeline(saga, ["reserve_inventory"]))
    first = published(callbacks)
    done = snapshot(saga)

    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), generation=0, redelivered=True)
    assert published(callbacks) == first
    assert snapshot(saga) == done

    release = rows(saga)["release_inventory"]
    release.republished = 1  # what the sweeper's re-publish leaves (saga_republish_from)
    release.save(using="orders", update_fields=["republished"])
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), generation=0, redelivered=True)
    assert published(callbacks) == []

    undo = timeline(saga, COMPENSATION[1:], generation=1)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_failure", result=report(saga, undo))
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("card declined"), generation=0, redelivered=True)
    assert published(callbacks) == []
    assert saga_row(saga).status == SagaStatus.COMPENSATED


def test_a_failure_report_with_no_stored_failure_or_a_refused_message_is_ignored(
    caplog: pytest.LogCaptureFixture, django_capture_on_commit_callbacks
) -> None:
    saga = start()
    done = snapshot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        # Forged: nothing failed under that task id.
        saga_step_failed(saga_id=saga.id, step_name="charge_payment", task_id=f"{saga.id}-charge_payment-g0")
        # The participant refused an unsigned message before acting: nothing to undo.
        fail(saga, "charge_payment", InvalidMessage("bad authority"))
        fail(SagaInstance(id=uuid.uuid4()), "charge_payment", StepFailed("x"), generation=0)
        fail(saga, "no_such_step", StepFailed("x"))
    assert snapshot(saga) == done
    assert published(callbacks) == []
    assert "has no stored failure" in caplog.text and "refused a message" in caplog.text
    assert "failed for unknown saga" in caplog.text and "has no step no_such_step" in caplog.text


def test_a_late_failure_of_a_step_that_succeeded_is_ignored(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    done = snapshot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", TransientError("gateway timeout"))
        fail(saga, "confirm_order", StepRefused("order is confirmed"))
    assert snapshot(saga) == done
    assert published(callbacks) == []


def test_a_late_failure_of_an_earlier_step_after_the_pivot_never_compensates(
    django_capture_on_commit_callbacks, caplog: pytest.LogCaptureFixture
) -> None:
    """The pivot committed without the charge's record; a copy of the charge then fails
    (a duplicate past its time limit): the original committed, the order is confirmed.

    Before the fix the copy's failure marked the step failed for good: no later record
    could correct it, and the completed saga showed a failed charge."""
    saga = start()
    assert pivot(saga, steps=["reserve_inventory"])
    with django_capture_on_commit_callbacks(using="orders") as callbacks, caplog.at_level(logging.WARNING):
        fail(saga, "charge_payment", TransientError("time limit"), timeline=timeline(saga, ["reserve_inventory"]))

    row = saga_row(saga)
    assert (row.status, row.generation, row.current_step, row.failure_step) == (
        SagaStatus.RUNNING,
        0,
        "notify_customer",
        "",
    )
    assert not rows(saga).keys() & set(COMPENSATION)
    # The step committed (the pivot needed it): a copy's failure does not make it failed.
    assert statuses(saga, FORWARD) == ["succeeded", "unknown", "succeeded", "running"]
    assert published(callbacks) == []
    assert "failed after the pivot committed" in caplog.text

    # The chain's record, drained later, shows the charge as the original ran it.
    steps = timeline(saga, FORWARD)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_customer", result=report(saga, steps))
    assert saga_row(saga).status == SagaStatus.COMPLETED
    charge = rows(saga)["charge_payment"]
    assert (charge.status, charge.last_error) == (StepStatus.SUCCEEDED, "")


def test_a_failure_after_the_pivot_needs_attention_and_compensates_nothing(django_capture_on_commit_callbacks) -> None:
    saga = start()
    assert pivot(saga)
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "notify_customer", TransientError("SMTP down"), attempt={"attempt": 13, "worker": "n@host"})

    row = saga_row(saga)
    assert (row.status, row.failure_step, row.failure_type, row.failure_reason) == (
        SagaStatus.NEEDS_ATTENTION,
        "notify_customer",
        "TransientError",
        "SMTP down",
    )
    assert (row.generation, row.outcome) == (0, "")
    notify = rows(saga)["notify_customer"]
    assert (notify.status, notify.attempts, notify.deadline_at) == (StepStatus.FAILED, 13, None)
    assert statuses(saga, FORWARD[:3]) == ["succeeded"] * 3
    assert not rows(saga).keys() & set(COMPENSATION)
    assert published(callbacks) == []


def test_a_failed_compensation_needs_attention(django_capture_on_commit_callbacks) -> None:
    saga = start()
    fail(saga, "charge_payment", PaymentDeclined("declined"), timeline=timeline(saga, ["reserve_inventory"]))
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(
            saga,
            "release_inventory",
            TransientError("inventory database down"),
            timeline=[],  # the chain's first step: no refund ran after the decline
        )

    row = saga_row(saga)
    assert (row.status, row.outcome, row.generation) == (SagaStatus.NEEDS_ATTENTION, "failed", 1)
    assert (row.failure_step, row.failure_type) == ("release_inventory", "TransientError")
    assert statuses(saga, COMPENSATION) == ["not_needed", "failed", "pending", "pending"]
    assert all(step.deadline_at is None for step in rows(saga).values())  # the sweeper leaves it alone
    assert published(callbacks) == []
    assert saga_compensate_check(row) == (
        "it is already compensating (release_inventory failed): retry it to finish compensating"
    )


def test_a_forward_step_that_fails_while_compensating_is_recorded_and_starts_nothing(
    django_capture_on_commit_callbacks,
) -> None:
    """The charge declines while a failure elsewhere (or a cancel) compensates the saga."""
    saga = start()
    with transaction.atomic(using="orders"):
        saga_begin_compensation(
            saga_row(saga), outcome="cancelled", failure_step="reserve_inventory", failure_type="Cancelled", reason="x"
        )
    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        fail(saga, "charge_payment", PaymentDeclined("declined"), generation=0)
        fail(saga, "confirm_order", StepRefused("the order is cancelled"), generation=0)

    row = saga_row(saga)
    assert (row.status, row.outcome, row.generation, row.failure_step) == (
        SagaStatus.COMPENSATING,
        "cancelled",
        1,
        "reserve_inventory",
    )
    # The reserve's outcome is still unknown; the charge failed; the confirm refused. The
    # notification the cancel left pending never runs.
    assert statuses(saga, FORWARD) == ["unknown", "failed", "refused", "pending"]
    assert published(callbacks) == []


def test_a_success_report_of_the_step_that_needed_attention_resumes_the_saga(
    django_capture_on_commit_callbacks,
) -> None:
    """A re-published copy of the notification succeeds after its step failed for good."""
    saga = start()
    assert pivot(saga)
    fail(saga, "notify_customer", TransientError("SMTP down"))
    steps = timeline(saga, FORWARD)
    steps[-1]["worker"] = "late@host"
    record = sealed_record(saga, "notify_customer", steps)
    task_id = store_record(saga, "notify_customer", record)

    with django_capture_on_commit_callbacks(using="orders") as callbacks:
        saga_reports_drain()

    row = saga_row(saga)
    assert (row.status, row.current_step) == (SagaStatus.COMPLETED, "")
    assert row.finished_at.isoformat() == steps[-1]["finished_at"]
    notify = rows(saga)["notify_customer"]
    assert (notify.status, notify.worker) == (StepStatus.SUCCEEDED, "late@host")
    assert not TaskResult.objects.filter(task_id=task_id).exists()
    assert published(callbacks) == []


def drain_to_compensated(saga: SagaInstance, undo: list[dict]) -> None:
    """Drain the compensation chain's record with timeline `undo` (generation 1): the saga
    ends compensated, when its last step finished."""
    record = sealed_record(saga, "notify_failure", undo, phase=StepPhase.COMPENSATION, generation=1)
    store_record(saga, "notify_failure", record, generation=1)
    saga_reports_drain()
    row = saga_row(saga)
    assert (row.status, row.current_step, row.outcome) == (SagaStatus.COMPENSATED, "", "failed")
    assert row.finished_at.isoformat() == undo[-1]["finished_at"]


def test_the_compensation_chains_record_ends_the_saga_compensated() -> None:
    saga = start()
    fail(saga, "reserve_inventory", StepFailed("out of stock"), timeline=[])
    undo = timeline(saga, COMPENSATION, generation=1)
    drain_to_compensated(saga, undo)

    assert statuses(saga, COMPENSATION) == ["succeeded"] * 4
    assert statuses(saga, FORWARD) == ["failed", "pending", "pending", "pending"]


def test_a_late_record_of_a_compensation_that_failed_for_good_ends_the_saga_compensated() -> None:
    """The release ran out of retries (or of re-publishes, the sweeper's StepTimedOut) while
    its worker was away; a copy still queued then ran the whole chain. Its record shows the
    release committed: the timeline says so, and the saga is compensated."""
    saga = start()
    fail(saga, "charge_payment", PaymentDeclined("declined"), timeline=timeline(saga, ["reserve_inventory"]))
    fail(saga, "release_inventory", TransientError("inventory database down"), timeline=[])
    assert saga_row(saga).status == SagaStatus.NEEDS_ATTENTION
    undo = timeline(saga, COMPENSATION[1:], generation=1, worker="late@host")
    drain_to_compensated(saga, undo)

    assert statuses(saga, COMPENSATION) == ["not_needed", "succeeded", "succeeded", "succeeded"]
    release = rows(saga)["release_inventory"]
    assert (release.worker, release.started_at.isoformat()) == ("late@host", undo[0]["started_at"])


def test_a_chains_record_ends_an_active_saga_whose_last_step_had_succeeded_already() -> None:
    """The release failed for good; a record without its entry (a chain re-published after
    it) showed the rest of the compensations succeeded; an operator retried the release.
    The retried chain's record ends the saga, rather than leaving it compensating with
    nothing running, which neither the sweeper nor a retry could move."""
    saga = start()
    fail(saga, "charge_payment", PaymentDeclined("declined"), timeline=timeline(saga, ["reserve_inventory"]))
    fail(saga, "release_inventory", TransientError("inventory database down"), timeline=[])
    rest = timeline(saga, COMPENSATION[2:], generation=1)
    saga_step_succeeded(saga_id=saga.id, step_name="notify_failure", result=report(saga, rest))
    assert saga_row(saga).status == SagaStatus.NEEDS_ATTENTION
    operator = get_user_model().objects.create_user(f"op-{uuid.uuid4().hex[:8]}")
    assert saga_retry(saga_id=saga.id, user=operator).outcome == "done"
    row = saga_row(saga)
    assert (row.status, row.current_step) == (SagaStatus.COMPENSATING, "release_inventory")
    again = timeline(saga, COMPENSATION[1:], generation=row.generation)

    saga_step_succeeded(saga_id=saga.id, step_name="notify_failure", result=report(saga, again))

    row = saga_row(saga)
    assert (row.status, row.current_step) == (SagaStatus.COMPENSATED, "")
    assert statuses(saga, COMPENSATION) == ["not_needed", "succeeded", "succeeded", "succeeded"]


def test_a_report_carries_its_output_into_the_context_later_steps_start_from() -> None:
    saga = start()
    steps = [entry(saga, "reserve_inventory", output={"reservation_id": "r1", "_private": 1})]
    saga_step_succeeded(saga_id=saga.id, step_name="reserve_inventory", result=report(saga, steps, amount="9.99"))
    context = saga_row(saga).context
    assert (context["reservation_id"], context["amount"]) == ("r1", "9.99")
    assert "_private" not in context and "_steps" not in context
