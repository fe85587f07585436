"""The timeline tells the truth (issue 11): what the saga store records as reports arrive,
against the orders database, with no workers (tests/test_order_saga.py goes through a real
cancel end to end).

A row is shown succeeded only with the participant's attempt and times; a step whose
outcome is not known says so; a step refused because the saga was compensating is
`refused`, not failed.
"""

import json
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from django_celery_results.models import TaskResult

from orders.saga import PLACE_ORDER
from saga import failure, recovery
from saga.admin import chain_position, failure_step_text, live_attempts, retry_reason, step_state
from saga.engine import task_id_for
from saga.failure import StoredFailure, saga_step_failed
from saga.models import SagaInstance, SagaStatus, SagaStep, StepStatus
from saga.progress import saga_pivot_commit, saga_step_succeeded
from saga.publish import saga_begin_compensation, saga_start
from saga.recovery import Held

pytestmark = pytest.mark.django_db(databases=["orders"])


def start() -> SagaInstance:
    with transaction.atomic(using="orders"):
        return saga_start(definition=PLACE_ORDER, order_id=uuid.uuid4(), context={"items": []})


def record(saga: SagaInstance, step: str, *, attempt: int = 1, worker: str = "w@host", seconds: int = 0) -> dict:
    """A participant's `_steps` entry (common.steps) for `step` of `saga`."""
    started = timezone.now() - timedelta(seconds=10 - seconds)
    return {
        "task_id": task_id_for(saga.id, step, saga.generation),
        "started_at": started.isoformat(),
        "finished_at": (started + timedelta(milliseconds=40)).isoformat(),
        "attempt": attempt,
        "worker": worker,
        "output": {},
    }


def cancel(saga: SagaInstance) -> None:
    """What the cancel endpoint does to the saga (orders.services.order_cancel)."""
    with transaction.atomic(using="orders"):
        locked = SagaInstance.objects.select_for_update().get(id=saga.id)
        saga_begin_compensation(
            locked, outcome="cancelled", failure_step=locked.current_step, failure_type="Cancelled", reason="x"
        )


def fail(monkeypatch, saga: SagaInstance, step: str, error_type: str, *, timeline=None, attempt=None) -> None:
    monkeypatch.setattr(
        failure, "_failure_from_backend", lambda task_id, **_: StoredFailure(error_type, "no", attested=True)
    )
    saga_step_failed(
        saga_id=saga.id,
        step_name=step,
        task_id=task_id_for(saga.id, step, 0),
        timeline=timeline,
        attempt=attempt,
    )


def rows(saga: SagaInstance) -> dict[str, SagaStep]:
    return {step.name: step for step in SagaStep.objects.filter(saga=saga)}


def statuses(saga: SagaInstance, *names: str) -> list[str]:
    steps = rows(saga)
    return [steps[name].status for name in names]


def assert_recorded(step: SagaStep, *, attempts: int = 1, worker: str = "w@host") -> None:
    assert step.status == StepStatus.SUCCEEDED
    assert (step.attempts, step.worker) == (attempts, worker)
    assert step.queued_at is not None and step.started_at is not None and step.finished_at is not None
    assert step.started_at < step.finished_at


FORWARD = ("reserve_inventory", "charge_payment", "confirm_order", "notify_customer")


def test_a_running_saga_is_on_its_first_step_and_nothing_else_has_happened() -> None:
    saga = start()
    assert statuses(saga, *FORWARD) == ["running", "pending", "pending", "pending"]
    assert saga.current_step == "reserve_inventory"


def test_a_cancel_leaves_what_the_chain_may_be_doing_unknown_not_cancelled() -> None:
    saga = start()
    cancel(saga)
    # The chain may be at any step up to the pivot; the notification after it never runs.
    assert statuses(saga, *FORWARD) == ["unknown", "unknown", "unknown", "pending"]
    assert all(rows(saga)[name].finished_at is None for name in FORWARD)
    assert (
        failure_step_text(SagaInstance.objects.get(id=saga.id))
        == "reserve_inventory, where the saga last knew its chain to be when the cancel came"
    )


def test_a_cancelled_saga_shows_what_ran_and_that_the_pivot_refused(monkeypatch) -> None:
    saga = start()
    cancel(saga)
    timeline = [record(saga, "reserve_inventory", seconds=0), record(saga, "charge_payment", attempt=2, seconds=1)]
    fail(monkeypatch, saga, "confirm_order", "StepRefused", timeline=timeline, attempt={"attempt": 1, "worker": "o@h"})

    steps = rows(saga)
    assert_recorded(steps["reserve_inventory"])
    assert_recorded(steps["charge_payment"], attempts=2)
    assert steps["confirm_order"].status == StepStatus.REFUSED
    assert steps["confirm_order"].last_error.startswith("StepRefused")
    assert (steps["confirm_order"].attempts, steps["confirm_order"].worker) == (1, "o@h")
    assert steps["notify_customer"].status == StepStatus.PENDING
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPENSATING
    # The cancel came while the chain was past the step the store knew of: the page says so.
    assert failure_step_text(SagaInstance.objects.get(id=saga.id)) == (
        "reserve_inventory, where the saga last knew its chain to be when the cancel came; "
        "the chain stopped at confirm_order, which refused"
    )


def test_a_cancel_before_the_first_step_ran_shows_it_refused_and_the_rest_never_ran(monkeypatch) -> None:
    saga = start()
    cancel(saga)
    fail(monkeypatch, saga, "reserve_inventory", "StepRefused", timeline=[])

    assert statuses(saga, *FORWARD) == ["refused", "pending", "pending", "pending"]


def test_a_failed_step_records_the_steps_before_it_from_its_report(monkeypatch) -> None:
    saga = start()
    fail(
        monkeypatch,
        saga,
        "charge_payment",
        "PaymentDeclined",
        timeline=[record(saga, "reserve_inventory")],
        attempt={"attempt": 1, "worker": "p@h"},
    )

    steps = rows(saga)
    assert_recorded(steps["reserve_inventory"])
    assert steps["charge_payment"].status == StepStatus.FAILED
    assert (steps["charge_payment"].attempts, steps["charge_payment"].worker) == (1, "p@h")
    # Queued when the step before it finished, as a succeeded step's row says: its queue wait shows.
    assert steps["charge_payment"].queued_at == steps["reserve_inventory"].finished_at
    assert statuses(saga, "confirm_order", "notify_customer") == ["pending", "pending"]
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPENSATING


def test_without_a_record_an_earlier_step_is_unknown_not_succeeded(monkeypatch) -> None:
    # A failure reported from a worker's main process (a hard time limit) carries no timeline.
    saga = start()
    fail(monkeypatch, saga, "charge_payment", "TimeLimitExceeded")

    steps = rows(saga)
    assert steps["reserve_inventory"].status == StepStatus.UNKNOWN
    assert steps["reserve_inventory"].started_at is None
    assert steps["charge_payment"].status == StepStatus.FAILED


def test_the_pivot_records_itself_and_the_steps_before_it_with_their_times() -> None:
    saga = start()
    timeline = [record(saga, "reserve_inventory"), record(saga, "charge_payment", seconds=1)]
    with transaction.atomic(using="orders"):
        assert saga_pivot_commit(saga_id=saga.id, order_id=saga.order_id, timeline=timeline, output={})

    steps = rows(saga)
    assert_recorded(steps["reserve_inventory"])
    assert_recorded(steps["charge_payment"])
    confirm = steps["confirm_order"]
    assert (confirm.status, confirm.attempts) == (StepStatus.SUCCEEDED, 1)
    assert confirm.started_at is not None and confirm.finished_at is not None
    # The saga is now on its notification.
    assert steps["notify_customer"].status == StepStatus.RUNNING
    assert SagaInstance.objects.get(id=saga.id).current_step == "notify_customer"

    # The chain's final report brings the pivot's own record (its worker and start).
    report = {**saga.context, "_steps": [*timeline, record(saga, "confirm_order", worker="o@h", seconds=2)]}
    report["_steps"].append(record(saga, "notify_customer", worker="n@h", seconds=3))
    saga_step_succeeded(saga_id=saga.id, step_name="notify_customer", result=report)
    steps = rows(saga)
    assert_recorded(steps["confirm_order"], worker="o@h")
    assert_recorded(steps["notify_customer"], worker="n@h")
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPLETED


def test_the_admin_shows_the_step_a_running_chain_is_on() -> None:
    saga = start()
    steps = rows(saga)
    live = {"charge_payment": Held("active", "payments@host")}
    # The store's running row is where the segment began; the workers say where it is now.
    assert step_state(steps["charge_payment"], live) == "Running on payments@host"
    assert step_state(steps["reserve_inventory"], live) == "Passed (the chain is further on)"
    assert step_state(steps["confirm_order"], live) == "Pending"
    assert step_state(steps["reserve_inventory"], {}) == "Running (no worker holds it now)"
    live = {"reserve_inventory": Held("scheduled", "inventory@host")}
    assert step_state(steps["reserve_inventory"], live) == "Waiting to retry on inventory@host"
    assert step_state(steps["reserve_inventory"], {"reserve_inventory": Held("{", "w@h")}) == "{ on w@h"
    # Its publish was never tried (saga.broker_latch): not queued, so not shown as running.
    steps["reserve_inventory"].queued_at = None
    assert step_state(steps["reserve_inventory"], {}) == "Not sent yet (the broker was away; the sweeper sends it)"


def test_the_saga_page_says_which_step_its_chain_is_on_not_where_it_began() -> None:
    saga = start()
    # A stray copy of the first step beside the chain further on: the furthest step counts.
    live = {"reserve_inventory": Held("reserved", "inventory@host"), "charge_payment": Held("active", "payments@host")}
    assert chain_position(saga, live) == "charge_payment: running on payments@host"
    assert chain_position(saga, {"confirm_order": Held("scheduled", "orders@Host")}) == (
        "confirm_order: waiting to retry on orders@Host"
    )
    assert chain_position(saga, {}) == ("reserve_inventory or a step after it (no worker holds one now)")
    cancel(saga)
    saga.refresh_from_db()
    # Compensating: the compensation chain's steps count, not a late forward copy.
    live = {"charge_payment": Held("active", "payments@host"), "release_inventory": Held("active", "inventory@host")}
    assert chain_position(saga, live) == "release_inventory: running on inventory@host"
    # A reply is whatever its sender wrote: shown as text, never used as a format.
    assert chain_position(saga, {"release_inventory": Held("{0.__class__}{", "w@h")}) == (
        "release_inventory: {0.__class__}{ on w@h"
    )
    saga.status = SagaStatus.COMPLETED
    saga.current_step = ""
    assert chain_position(saga, {}) == "-"


@pytest.mark.django_db(databases=["default"])
def test_a_step_waiting_to_retry_shows_the_error_its_worker_stored() -> None:
    error = {"exc_type": "ProviderError", "exc_message": ["provider answered 503"], "exc_module": "payments"}
    TaskResult.objects.create(task_id="t-retry", status="RETRY", result=json.dumps(error))
    TaskResult.objects.create(task_id="t-done", status="SUCCESS", result="{}")
    TaskResult.objects.create(task_id="t-odd", status="RETRY", result='"not an exception"')
    assert retry_reason("t-retry") == "ProviderError: provider answered 503"
    assert retry_reason("t-done") == retry_reason("t-none") == retry_reason("t-odd") == ""


def test_the_admin_does_not_call_a_step_that_will_not_run_pending(monkeypatch) -> None:
    saga = start()
    fail(monkeypatch, saga, "charge_payment", "PaymentDeclined", timeline=[record(saga, "reserve_inventory")])
    steps = rows(saga)
    # The chain stopped at the charge: what came after it will not run.
    assert step_state(steps["confirm_order"], {}) == "Not run (the saga compensated instead)"
    assert step_state(steps["notify_customer"], {}) == "Not run (the saga compensated instead)"
    # The compensations the saga is about to run are pending, and say so.
    assert steps["notify_failure"].status == StepStatus.PENDING
    assert step_state(steps["notify_failure"], {}) == "Pending"
    SagaInstance.objects.filter(id=saga.id).update(status=SagaStatus.NEEDS_ATTENTION)
    assert step_state(rows(saga)["confirm_order"], {}) == "Not run (the saga waits for an operator)"


def test_a_late_refused_copy_does_not_rewrite_the_failure_that_started_the_compensation(monkeypatch) -> None:
    saga = start()
    fail(monkeypatch, saga, "reserve_inventory", "OutOfStock", timeline=[])
    # A redelivered copy meets the release's tombstone and refuses.
    fail(monkeypatch, saga, "reserve_inventory", "StepRefused", timeline=[])

    step = rows(saga)["reserve_inventory"]
    assert (step.status, step.last_error) == (StepStatus.FAILED, "OutOfStock: no")


def test_a_copy_that_succeeds_after_its_step_failed_for_good_is_shown_with_its_attempt_and_times(
    monkeypatch,
) -> None:
    """A duplicate of the charge outlived the breaker that failed the step for good: the
    saga is compensating, and the late copy's own record shows what it did (helper-8's
    replicated chaos run found it shown succeeded with no start time)."""
    saga = start()
    reserve = record(saga, "reserve_inventory")
    attempt = {"attempt": 6, "worker": "p@h"}
    fail(monkeypatch, saga, "charge_payment", "CircuitOpen", timeline=[reserve], attempt=attempt)
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPENSATING
    assert rows(saga)["charge_payment"].status == StepStatus.FAILED

    late = record(saga, "charge_payment", attempt=7, worker="p2@h", seconds=1)
    saga_step_succeeded(saga_id=saga.id, step_name="charge_payment", result={**saga.context, "_steps": [reserve, late]})

    assert_recorded(rows(saga)["charge_payment"], attempts=7, worker="p2@h")
    assert SagaInstance.objects.get(id=saga.id).status == SagaStatus.COMPENSATING  # its refund undoes it


def test_a_held_step_counts_its_attempts_by_the_retries_its_worker_gives() -> None:
    # The store hears of a step's attempts only when it ends; until then its worker says.
    assert live_attempts(Held("active", "p@h")) == "1 (the last one running)"
    assert live_attempts(Held("active", "p@h", retries=2)) == "3 (the last one running)"
    assert live_attempts(Held("scheduled", "p@h", retries=2)) == "2 failed so far"
    assert live_attempts(Held("reserved", "p@h")) == "0"


def test_a_worker_reply_of_any_shape_reads_as_held_or_not_at_all(monkeypatch) -> None:
    # Replies are whatever their senders wrote (anyone who can publish to the broker): the
    # saga's page must not fail on one, nor show a count that is none.
    replies = {
        "payments@h": {
            "t-1": ["scheduled", {"id": "t-1", "retries": 3}],
            "t-2": ["active", {"id": "t-2", "retries": "9; drop table"}],
            "t-3": ["active", {"id": "t-3", "retries": True}],
            "t-4": "not a pair",
            "t-5": ["reserved", None],
            "t-6": ["a", "b", "c"],
        },
        "odd@h": ["not", "a", "mapping"],
        "none@h": None,
    }
    monkeypatch.setattr(recovery, "_query", lambda task_ids: replies)
    assert recovery.query_tasks(["t-1"]) == {
        "t-1": Held("scheduled", "payments@h", 3),
        "t-2": Held("active", "payments@h", 0),
        "t-3": Held("active", "payments@h", 0),
        "t-5": Held("reserved", "payments@h", 0),
    }
