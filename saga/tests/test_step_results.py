"""How Celery shows a participant's result and arguments (no broker, no database).

A step returns the whole saga context (the next step needs it), but Celery's log line,
its task-succeeded event (Flower) and the result backend show only ids and outcomes
(common.steps). These tests pin the Celery and kombu behaviour that relies on, so an
upgrade that changes it fails here rather than in a log.
"""

import json

from celery.app import trace
from celery.app.task import Context
from celery.utils.saferepr import saferepr
from kombu.utils.json import dumps, loads

from common.steps import RedactedReprTask, SagaContext, stored_args_repr
from orders_project.celery import app

CONTEXT = {
    "saga_id": "00000000-0000-0000-0000-000000000001",
    "order_id": "00000000-0000-0000-0000-000000000002",
    "email": "someone@example.com",
    "phone": "+15550100",
    "payment_token": "tok_visa",
    "items": [{"sku": "MUG", "quantity": 2}],
    "outcome": "confirmed",
    "_seal": "eyJzYWdhIjoi.signature",
    "_steps": [
        {
            "task_id": "00000000-0000-0000-0000-000000000001-reserve_inventory-g0",
            "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:01+00:00",
            "attempt": 1,
            "worker": "inventory@host",
            "output": {"amount": "20.00"},
            "extra": "someone@example.com",
        }
    ],
}
SECRETS = ("someone@example.com", "+15550100", "tok_visa", "eyJzYWdh", "signature")


def test_celery_logs_and_reports_a_step_result_as_its_ids_and_outcome() -> None:
    # celery.app.trace renders the return value with saferepr for the "succeeded in" log
    # line and the task-succeeded event's `result`; a Mapping that is not a dict is shown
    # by its own repr instead of item by item.
    assert trace.saferepr is saferepr
    shown = saferepr(SagaContext(CONTEXT), app.Task.resultrepr_maxsize)
    assert shown.startswith("<saga context ") and "outcome=confirmed" in shown and CONTEXT["saga_id"] in shown
    assert not [s for s in SECRETS if s in shown]


def test_a_step_result_travels_to_the_next_step_whole_as_plain_json() -> None:
    wire = dumps(SagaContext(CONTEXT))
    assert json.loads(wire) == CONTEXT
    received = loads(wire)
    assert type(received) is dict and received == CONTEXT


def test_a_failed_step_stores_its_ids_and_the_chains_timing_only() -> None:
    stored = stored_args_repr(CONTEXT)
    assert not [s for s in SECRETS if s in stored]
    [args] = json.loads(stored)
    assert args["saga_id"] == CONTEXT["saga_id"]
    assert args["_steps"][0]["task_id"] == CONTEXT["_steps"][0]["task_id"]
    assert args["_steps"][0]["output"] == {"amount": "20.00"}
    assert json.loads(stored_args_repr({"saga_id": "x", "_steps": "nonsense"})) == [{"saga_id": "x", "_steps": []}]


def _echo(ctx: dict) -> dict:
    return ctx


def _probe(base: type) -> object:
    return app.task(name=f"tests.retry_probe_{base.__name__}", base=base, shared=False, lazy=False)(_echo)


def _request() -> Context:
    return Context(id="t1", args=(CONTEXT,), kwargs={"authority": "secret"}, argsrepr="(<ctx>,)", kwargsrepr="{<auth>}")


def test_a_retried_step_keeps_its_redacted_argument_reprs() -> None:
    sig = _probe(RedactedReprTask).signature_from_request(_request())
    assert (sig.options["argsrepr"], sig.options["kwargsrepr"]) == ("(<ctx>,)", "{<auth>}")


def test_celery_retry_still_drops_argsrepr_and_kwargsrepr() -> None:
    """Upstream: celery/celery#6086 (fix proposed in celery/celery#7206). When this fails,
    Celery keeps them on retry itself: drop RedactedReprTask.signature_from_request."""
    sig = _probe(app.Task).signature_from_request(_request())
    assert "argsrepr" not in sig.options and "kwargsrepr" not in sig.options
