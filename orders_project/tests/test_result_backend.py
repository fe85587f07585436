"""The result backend reads a task's outcome in one statement (orders_project.result_backend)
and returns exactly what django-celery-results' own read returns: the coordinator reads
each failed step's exception and arguments there (saga.failure)."""

import uuid
from types import SimpleNamespace

import pytest
from celery import states
from django_celery_results.backends.database import DatabaseBackend as LibraryBackend

from common.exceptions import InvalidMessage
from orders_project.celery import app
from saga.tests.conftest import django_db_setup  # noqa: F401  (the fixture, shared)

pytestmark = pytest.mark.django_db(databases=["default"])


class PaymentDeclined(Exception):
    pass


def library_read(task_id: str) -> dict:
    return LibraryBackend._get_task_meta_for(app.backend, task_id)


def test_a_stored_failure_with_its_arguments_reads_as_the_library_reads_it() -> None:
    task_id = f"test-{uuid.uuid4()}"
    request = SimpleNamespace(
        id=task_id,
        task="payments.charge",
        args='[{"saga_id": "s", "_steps": []}]',  # a step stores its ids and timing, not its context
        kwargs={"record": True},
        hostname="payments@host",
        retries=2,
        delivery_info={"routing_key": "payments", "exchange": ""},
        argsrepr='[{"saga_id": "s", "_steps": []}]',
        kwargsrepr="{}",
        ignore_result=False,
        group=None,
        group_index=None,
        parent_id=None,
        root_id=None,
        periodic_task_name=None,
        children=[],
        chord=None,
    )
    app.backend.store_result(task_id, PaymentDeclined("declined: card_declined"), states.FAILURE, request=request)

    ours, theirs = app.backend._get_task_meta_for(task_id), library_read(task_id)
    assert isinstance(ours["result"], PaymentDeclined) and str(ours["result"]) == "declined: card_declined"
    assert type(ours["result"]) is type(theirs["result"]) and str(ours["result"]) == str(theirs["result"])
    ours.pop("result"), theirs.pop("result")
    assert ours == theirs
    assert (ours["status"], ours["args"], ours["worker"]) == (states.FAILURE, request.args, "payments@host")

    result = app.AsyncResult(task_id)
    assert (result.state, type(result.result), result.args) == (states.FAILURE, PaymentDeclined, request.args)


def test_a_success_and_an_unknown_task_read_as_the_library_reads_them() -> None:
    task_id = f"test-{uuid.uuid4()}"
    app.backend.store_result(task_id, {"saga_id": "s", "outcome": "confirmed"}, states.SUCCESS)
    assert app.backend._get_task_meta_for(task_id) == library_read(task_id)
    assert app.AsyncResult(task_id).result == {"saga_id": "s", "outcome": "confirmed"}

    unknown = f"test-{uuid.uuid4()}"
    assert app.backend._get_task_meta_for(unknown) == library_read(unknown)
    assert app.AsyncResult(unknown).state == states.PENDING


def test_a_refusal_reads_back_as_the_participants_exception() -> None:
    task_id = f"test-{uuid.uuid4()}"
    app.backend.store_result(task_id, InvalidMessage("forged"), states.FAILURE)
    result = app.AsyncResult(task_id)
    assert (result.state, type(result.result), str(result.result)) == (states.FAILURE, InvalidMessage, "forged")


def test_a_failed_step_stores_its_own_failure_and_none_for_the_steps_chained_after_it() -> None:
    """One write per failed task (docs/DECISIONS.md, "Results"): Celery's own backend also
    marks every task left in the chain failed, which nobody reads."""
    failed, later = f"test-{uuid.uuid4()}", [f"test-{uuid.uuid4()}" for _ in range(2)]
    chain = [
        {"task": task, "args": [], "kwargs": {}, "options": {"task_id": task_id}, "subtask_type": None}
        for task, task_id in zip(["notifications.notify", "orders.confirm"], reversed(later), strict=True)
    ]
    request = SimpleNamespace(id=failed, task="payments.charge", chain=chain, chord=None, errbacks=None)
    app.backend.mark_as_failure(failed, PaymentDeclined("declined"), request=request, call_errbacks=False)

    assert app.AsyncResult(failed).state == states.FAILURE
    assert [app.backend._get_task_meta_for(task_id)["status"] for task_id in later] == [states.PENDING] * 2


def test_a_late_retry_does_not_hide_the_failure_of_the_attempt_it_published() -> None:
    """`Task.retry` publishes the next attempt, then its worker stores RETRY. With a short
    countdown the next attempt can fail for good first: its FAILURE, which its failure
    report sends the coordinator to read (saga.failure), must survive the late RETRY."""
    task_id = f"test-{uuid.uuid4()}"
    app.backend.mark_as_failure(task_id, PaymentDeclined("the refund failed for good"), call_errbacks=False)
    app.backend.mark_as_retry(task_id, PaymentDeclined("provider answered 503"))

    result = app.AsyncResult(task_id)
    assert (result.state, str(result.result)) == (states.FAILURE, "the refund failed for good")


def test_a_stored_success_is_final_and_a_failure_gives_way_only_to_an_outcome() -> None:
    """A chain's record (a SUCCESS) waits in the result backend for the coordinator's drain:
    a late copy of its step that failed must not replace it. A FAILURE is replaced by a
    later copy's SUCCESS, not by a copy that is only starting or retrying."""
    recorded = f"test-{uuid.uuid4()}"
    app.backend.store_result(recorded, {"saga_id": "s", "outcome": "confirmed"}, states.SUCCESS)
    app.backend.mark_as_failure(recorded, PaymentDeclined("a late copy"), call_errbacks=False)
    app.backend.mark_as_started(recorded)
    assert app.AsyncResult(recorded).result == {"saga_id": "s", "outcome": "confirmed"}

    failed = f"test-{uuid.uuid4()}"
    app.backend.mark_as_failure(failed, PaymentDeclined("first"), call_errbacks=False)
    app.backend.mark_as_started(failed)
    assert app.AsyncResult(failed).state == states.FAILURE
    app.backend.mark_as_revoked(failed, "terminated")
    assert app.AsyncResult(failed).state == states.REVOKED
    app.backend.store_result(failed, {"saga_id": "s"}, states.SUCCESS)
    assert (app.AsyncResult(failed).state, app.AsyncResult(failed).result) == (states.SUCCESS, {"saga_id": "s"})

    retried = f"test-{uuid.uuid4()}"
    app.backend.mark_as_retry(retried, PaymentDeclined("provider answered 503"))
    app.backend.mark_as_failure(retried, PaymentDeclined("for good"), call_errbacks=False)
    assert app.AsyncResult(retried).state == states.FAILURE
