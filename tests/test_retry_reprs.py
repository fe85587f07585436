"""A retried task keeps its redacted argument reprs, wherever it receives a saga context,
an authority or a seal: Celery renders the arguments again on retry otherwise
(celery/celery#6086; saga/tests/test_step_results.py checks Celery still does)."""

from celery.app.task import Context

import inventory.tasks
import notifications.tasks
import saga.tasks


def test_every_task_that_receives_a_context_authority_or_seal_keeps_its_redacted_reprs() -> None:
    """The saga steps, the coordinator's reports, and both ends of a settlement (an
    authority in; a seal out, sent on to `saga.settled`)."""
    request = Context(
        id="t1", args=({"saga_id": "s"},), kwargs={"authority": "secret"}, argsrepr="(<ctx>,)", kwargsrepr="{<auth>}"
    )
    tasks = [
        inventory.tasks.record_sales,
        inventory.tasks.reserve,
        notifications.tasks.notify,
        saga.tasks.settled,
        saga.tasks.step_succeeded,
        saga.tasks.step_failed,
    ]
    for task in tasks:
        sig = task.signature_from_request(request)
        assert (sig.options.get("argsrepr"), sig.options.get("kwargsrepr")) == ("(<ctx>,)", "{<auth>}"), task.name


def test_a_worker_shows_only_the_reprs_of_a_task_it_holds_to_any_control_command() -> None:
    """`inspect reserved / scheduled / query_task` (and Flower's worker pages, which ask
    for reserved and scheduled tasks) get a held request's `info()`: Celery's own gives its
    real arguments, the customer's email and card token and the step's authority."""
    from celery.contrib.testing.mocks import TaskMessage
    from celery.utils.imports import symbol_by_name
    from celery.worker.request import Request

    import orders.tasks
    import payments.tasks
    from orders_project.celery import app

    secret_ctx = {"saga_id": "s", "email": "leak@example.com", "payment_token": "tok_visa"}
    tasks = [
        inventory.tasks.record_sales,
        inventory.tasks.reserve,
        inventory.tasks.release,
        notifications.tasks.notify,
        orders.tasks.confirm,
        orders.tasks.fail,
        payments.tasks.charge,
        payments.tasks.refund,
        saga.tasks.settled,
        saga.tasks.step_succeeded,
        saga.tasks.step_failed,
    ]
    for task in tasks:
        message = TaskMessage(
            task.name, args=(secret_ctx,), kwargs={"authority": "secret"}, argsrepr="(<ctx>,)", kwargsrepr="{<auth>}"
        )
        request = symbol_by_name(task.Request)(message, app=app, task=task)
        assert (request.info()["args"], request.info()["kwargs"]) == ("(<ctx>,)", "{<auth>}"), task.name
        # Not vacuous: Celery's own request shows the arguments themselves.
        assert list(Request(message, app=app, task=task).info()["args"]) == [secret_ctx]
