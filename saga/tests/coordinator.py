"""What the coordinator's tests (test_coordinator*.py) share: a saga in the orders test
database, the messages that reach the coordinator as their senders write them, and a look
at what it publishes.

Nothing here stands in for the system: a failure report's exception is stored in the real
result backend (the `default` test database, as a failing worker stores it) and read back
by the coordinator (saga.failure); a chain's record is sealed as its last step seals it and
stored where that step stores it; what the coordinator publishes is read from the `transaction.on_commit`
callbacks it registers on the orders connection (`django_capture_on_commit_callbacks`,
not executed: no worker runs in these tests, and the test's transaction never commits).
"""

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from celery import states
from celery.app.task import Context
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import transaction
from django.test import Client
from django.utils import timezone
from django_celery_results.models import TaskResult

from common.signing import Authority, context_digest, failure_seal, seal
from common.steps import stored_args_repr
from orders.saga import PLACE_ORDER
from orders_project.celery import app
from saga.definition import SagaDefinition
from saga.engine import task_id_for
from saga.failure import saga_step_failed
from saga.models import SagaInstance, SagaStep, StepPhase
from saga.progress import saga_pivot_commit
from saga.publish import saga_start

FORWARD = tuple(step.name for step in PLACE_ORDER.steps)
COMPENSATION = tuple(step.name for step in PLACE_ORDER.compensation_steps())
COMPENSATION_TASKS = ["payments.refund", "inventory.release", "orders.fail", "notifications.notify"]


class PaymentDeclined(Exception):
    """A business failure as a participant raises it (the coordinator reads only its type
    and message: it imports no participant)."""


def staff_client(*codenames: str) -> Client:
    """The admin as a new staff account with exactly these permissions sees it."""
    user = get_user_model().objects.create_user(f"staff-{uuid.uuid4().hex[:8]}", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def start(definition: SagaDefinition = PLACE_ORDER, **context: Any) -> SagaInstance:
    """A new saga, as the order request writes it (its chain's publish never runs: the
    test's transaction does not commit)."""
    with transaction.atomic(using="orders"):
        return saga_start(definition=definition, order_id=uuid.uuid4(), context={"items": [], **context})


def saga_row(saga: SagaInstance) -> SagaInstance:
    return SagaInstance.objects.using("orders").get(id=saga.id)


def rows(saga: SagaInstance) -> dict[str, SagaStep]:
    return {step.name: step for step in SagaStep.objects.using("orders").filter(saga_id=saga.id)}


def statuses(saga: SagaInstance, names: Iterable[str]) -> list[str]:
    steps = rows(saga)
    return [steps[name].status for name in names]


SETTLEMENT_FIELDS = ("settlement_sent_at", "settled_at")


def snapshot(saga: SagaInstance) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every column of the saga and its steps: equal snapshots mean nothing was written.
    The settlement's columns are left out: the sweep settles any saga past its pivot
    (saga.settlement), whatever else it does or does not do to it."""
    row = saga_row(saga)
    saga_fields = {
        f.attname: getattr(row, f.attname)
        for f in SagaInstance._meta.concrete_fields
        if f.attname not in SETTLEMENT_FIELDS
    }
    step_fields = {
        name: {f.attname: getattr(step, f.attname) for f in SagaStep._meta.concrete_fields}
        for name, step in rows(saga).items()
    }
    return saga_fields, step_fields


def entry(
    saga: SagaInstance,
    step: str,
    *,
    generation: int | None = None,
    attempt: int = 1,
    worker: str = "w@host",
    finished: datetime | None = None,
    output: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A participant's `_steps` entry (common.steps) for `step`: it committed."""
    finished = finished or timezone.now() - timedelta(seconds=5)
    return {
        "task_id": task_id_for(saga.id, step, saga.generation if generation is None else generation),
        "started_at": (finished - timedelta(milliseconds=40)).isoformat(),
        "finished_at": finished.isoformat(),
        "attempt": attempt,
        "worker": worker,
        "output": output or {},
    }


def timeline(saga: SagaInstance, names: Sequence[str], *, generation: int | None = None, **kw: Any) -> list[dict]:
    """Entries for `names` in order, each finishing a second after the one before."""
    end = timezone.now() - timedelta(seconds=5)
    return [
        entry(saga, name, generation=generation, finished=end - timedelta(seconds=len(names) - i), **kw)
        for i, name in enumerate(names)
    ]


def report(saga: SagaInstance, steps: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A success report's body: the reporting step's output with the chain's timeline."""
    return {"saga_id": str(saga.id), "order_id": str(saga.order_id), **fields, "_steps": steps}


def sealed_record(
    saga: SagaInstance, step: str, steps: list[dict[str, Any]], *, phase: str = StepPhase.FORWARD, generation: int = 0
) -> dict[str, Any]:
    """A chain's record as its last step seals it (common.steps): under the authority the
    coordinator minted for that step (this test holds SECRET_KEY, as every process does)."""
    authority = Authority(str(saga.id), step, "", phase, generation, context_digest(saga.context), "")
    return seal(report(saga, steps), authority)


def store_record(saga: SagaInstance, step: str, record: dict[str, Any], *, generation: int = 0) -> str:
    """Store `record` where the chain's last step stores it: the result backend, by task id."""
    task_id = task_id_for(saga.id, step, generation)
    # An upsert, as the backend's (orders_project.result_backend): a copy that succeeds
    # under a task id that failed before replaces its failure.
    TaskResult.objects.using("default").update_or_create(
        task_id=task_id,
        defaults={"status": states.SUCCESS, "result": json.dumps(record), "content_type": "application/json"},
    )
    return task_id


def fail(
    saga: SagaInstance,
    step: str,
    error: BaseException,
    *,
    generation: int | None = None,
    timeline: list[dict[str, Any]] | None = None,
    attempt: dict[str, Any] | None = None,
    redelivered: bool = False,
) -> str:
    """A step's failure report, as it reaches the coordinator: the failing worker stored
    the exception in the result backend, with its ids and its seal over the failure's
    type (common.steps), then its errback names the task id. `redelivered`: the broker
    delivers the report again (the worker that took it first died)."""
    task_id = task_id_for(saga.id, step, saga_row(saga).generation if generation is None else generation)
    sealed = failure_seal(saga_id=saga.id, step=step, task_id=task_id, error_type=type(error).__name__)
    stored = Context(id=task_id, argsrepr=stored_args_repr({"saga_id": str(saga.id)}, sealed_failure=sealed))
    app.backend.store_result(task_id, error, states.FAILURE, request=stored)
    saga_step_failed(
        saga_id=saga.id, step_name=step, task_id=task_id, timeline=timeline, attempt=attempt, redelivered=redelivered
    )
    return task_id


def published(callbacks: Iterable[Any]) -> list[list[tuple[str, str]]]:
    """Each chain the coordinator would publish on commit: (task name, task id) per step.

    Precondition: `callbacks` from `django_capture_on_commit_callbacks(using="orders")`;
    each is `partial(saga.publish._publish, signature, ...)`.
    """
    chains = []
    for callback in callbacks:
        if not isinstance(callback, partial) or callback.func.__name__ != "_publish":
            continue  # not a saga's chain: e.g. the sweep's settlement batch (saga.settlement)
        signature = callback.args[0]
        tasks = getattr(signature, "tasks", None) or [signature]
        chains.append([(task.task, task.options["task_id"]) for task in tasks])
    return chains


def ids(saga: SagaInstance, names: Iterable[str], generation: int) -> list[str]:
    return [task_id_for(saga.id, name, generation) for name in names]


def pivot(saga: SagaInstance, steps: Sequence[str] = ("reserve_inventory", "charge_payment"), **output: Any) -> bool:
    """The pivot's own transaction records it (orders.confirm -> saga_pivot_commit)."""
    with transaction.atomic(using="orders"):
        return saga_pivot_commit(saga_id=saga.id, order_id=saga.order_id, timeline=timeline(saga, steps), output=output)
