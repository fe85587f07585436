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
