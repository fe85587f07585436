"""Malformed and forged messages, sent straight to each service's queue, change nothing.

Each task validates its message before acting (common.steps, common.signing and the
tasks themselves): a message that is not an object, lacks a field, has a field of the
wrong type, or is for a saga the coordinator never started (no valid signature) fails
with InvalidMessage, is logged by the worker, and leaves every database as it was.
"""

import uuid

import pytest
from django.db import connections
from django.utils import timezone

from common.exceptions import InvalidMessage, StepRefused
from common.signing import SIGNATURE_FIELD, context_sign
from devstack.topology import Topology, wait_for
from orders.models import Order
from orders_project.celery import app
from saga.models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus

from .api import Api, make_product

pytestmark = pytest.mark.integration

SERVICE_DATABASES = ("orders", "inventory", "payments", "notifications")
# In the shared database only these are business data: Celery's results and beat's
# schedule change all the time (and record these very failures).
DEFAULT_TABLES = ("auth_user", "common_apitoken")


def database_snapshot() -> dict[str, str]:
    """A digest of every row of every table of the service databases (and the users)."""
    digests = {}
    for alias in ("default", *SERVICE_DATABASES):
        connection = connections[alias]
        tables = DEFAULT_TABLES if alias == "default" else connection.introspection.table_names()
        with connection.cursor() as cursor:
            for table in tables:
                name = connection.ops.quote_name(table)
                cursor.execute(f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {name} t")
                digests[f"{alias}.{table}"] = cursor.fetchone()[0]
    return digests


def running_saga(sku: str) -> SagaInstance:
    """An order whose saga is running, stopped before its first step (nothing published)."""
    order = Order.objects.create(
        user_id=0, email="held@example.com", payment_token="tok_visa", total=10, currency="USD"
    )
    context = {
        "email": order.email,
        "phone": "",
        "items": [{"sku": sku, "quantity": 1, "unit_price": "10.00"}],
        "total": "10.00",
        "payment_token": order.payment_token,
        "currency": "USD",
    }
    saga_id = uuid.uuid4()
    saga = SagaInstance.objects.create(
        id=saga_id,
        definition="place_order",
        order_id=order.id,
        current_step="reserve_inventory",
        context={**context, "saga_id": str(saga_id), "order_id": str(order.id)},
    )
    SagaStep.objects.create(
        saga=saga,
        phase=StepPhase.FORWARD,
        position=0,
        name="reserve_inventory",
        task_name="inventory.reserve",
        status=StepStatus.RUNNING,
        queued_at=timezone.now(),
    )
    return saga


def test_malformed_and_forged_messages_are_rejected_on_every_queue(api: Api, topology: Topology, sku: str) -> None:
    make_product(sku, on_hand=5)
    confirmed = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    assert confirmed["status"] == "confirmed"
    real = SagaInstance.objects.get(id=confirmed["saga"]["id"])
    held = running_saga(sku)

    def forged(**fields: object) -> dict:
        """A well-formed message for a saga nobody started, signed with a made-up key."""
        ctx = {
            **held.context,
            "saga_id": str(uuid.uuid4()),
            "order_id": str(uuid.uuid4()),
            "amount": "10.00",
            "outcome": "confirmed",
            **fields,
        }
        return {**ctx, SIGNATURE_FIELD: "forged-0123456789abcdefghijklmnopqrstuvwxyz"}

    def signed(base: dict, **fields: object) -> dict:
        """Signed as the coordinator would (a coordinator bug): only the task's own checks stop it."""
        return context_sign({**base, **fields})

    unsigned = {k: v for k, v in forged().items() if k != SIGNATURE_FIELD}
    participant_tasks = {
        "inventory.reserve": "inventory",
        "inventory.release": "inventory",
        "payments.charge": "payments",
        "payments.refund": "payments",
        "orders.confirm": "orders",
        "orders.fail": "orders",
        "notifications.notify": "notifications",
    }
    cases: list[tuple[str, str, list, dict, type[Exception], str]] = []
    for task, queue in participant_tasks.items():
        cases += [
            (task, queue, ["not a saga context"], {}, InvalidMessage, "expects a saga context object"),
            (task, queue, [unsigned], {}, InvalidMessage, "unsigned saga message"),
            (task, queue, [forged()], {}, InvalidMessage, "bad signature"),
            # The real saga's message, with more of the product ordered.
            (
                task,
                queue,
                [{**held.context, **signed(held.context), "items": [{"sku": sku, "quantity": 5}]}],
                {},
                InvalidMessage,
                "bad signature",
            ),
        ]
    base = {**held.context, "amount": "10.00", "outcome": "confirmed"}
    cases += [
        # Signed, but with a field of the wrong type or missing.
        (
            "inventory.reserve",
            "inventory",
            [signed(base, items=[{"sku": sku, "quantity": "1"}])],
            {},
            InvalidMessage,
            "malformed order line",
        ),
        ("inventory.reserve", "inventory", [signed(base, items=[[sku, 1]])], {}, InvalidMessage, "malformed"),
        ("inventory.release", "inventory", [signed(base, saga_id="not-a-uuid")], {}, InvalidMessage, "saga_id"),
        ("payments.charge", "payments", [signed(base, total="lots")], {}, InvalidMessage, "total"),
        ("payments.charge", "payments", [signed(base, total="-5")], {}, InvalidMessage, "total"),
        ("payments.charge", "payments", [signed(base, payment_token=None)], {}, InvalidMessage, "payment_token"),
        ("payments.refund", "payments", [signed(base, saga_id=42)], {}, InvalidMessage, "saga_id"),
        (
            "orders.confirm",
            "orders",
            [signed({k: v for k, v in base.items() if k != "total"})],
            {},
            InvalidMessage,
            "total",
        ),
        ("orders.fail", "orders", [signed(base, order_id=None)], {}, InvalidMessage, "order_id"),
        ("notifications.notify", "notifications", [signed(base, outcome="bogus")], {}, InvalidMessage, "outcome"),
        ("notifications.notify", "notifications", [signed(base, email=["x@example.com"])], {}, InvalidMessage, "email"),
        # The held saga's own (valid) message, sent to a compensation: it is not compensating.
        ("orders.fail", "orders", [signed(base)], {}, StepRefused, "is not compensating"),
        # The coordinator: malformed reports, and success reports that no step sent.
        ("saga.step_succeeded", "saga", [{}], {"saga_id": "not-a-uuid", "step": "x"}, InvalidMessage, "saga_id"),
        (
            "saga.step_succeeded",
            "saga",
            [{}],
            {"saga_id": str(held.id), "step": ["reserve_inventory"]},
            InvalidMessage,
            "step",
        ),
        (
            "saga.step_succeeded",
            "saga",
            ["done"],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "no step output",
        ),
        (
            "saga.step_succeeded",
            "saga",
            [{**base, "saga_id": str(held.id)}],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "unsigned",
        ),
        (
            "saga.step_succeeded",
            "saga",
            [signed(real.context)],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "another saga",
        ),
        (
            "saga.step_failed",
            "saga",
            [42],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "task_id",
        ),
        (
            "saga.step_failed",
            "saga",
            ["some-task"],
            {"saga_id": "0", "step": "reserve_inventory"},
            InvalidMessage,
            "saga_id",
        ),
    ]

    wait_for(
        lambda: (
            not SagaInstance.objects.filter(status__in=[SagaStatus.RUNNING, SagaStatus.COMPENSATING])
            .exclude(id=held.id)
            .exists()
        ),
        timeout=120,
        what="earlier tests' sagas to finish",
    )
    before = database_snapshot()

    sent = [
        (app.send_task(task, args=args, kwargs=kwargs, queue=queue, ignore_result=False), task, queue, error, text)
        for task, queue, args, kwargs, error, text in cases
    ]
    # A forged failure report (no failure stored for its task id), even for a real running
    # saga, is logged and ignored: it must not make a healthy saga compensate.
    unknown = app.send_task(
        "saga.step_failed",
        args=[f"{held.id}-reserve_inventory-g0"],
        kwargs={"saga_id": str(held.id), "step": "reserve_inventory"},
        queue="saga",
        ignore_result=False,
    )

    def logged(queue: str, line: str) -> bool:
        return line in topology.processes[queue].log_path.read_text(errors="replace")

    for result, task, queue, error, text in sent:
        result.get(timeout=60, propagate=False)
        assert result.state == "FAILURE", (task, result.state, result.result)
        assert isinstance(result.result, error) and text in str(result.result), (task, result.result)
        line = f"{task}[{result.id}] raised unexpected: {type(result.result).__name__}"
        wait_for(lambda queue=queue, line=line: logged(queue, line), timeout=10, what=f"the {queue} worker's log")
    unknown.get(timeout=60)
    assert unknown.state == "SUCCESS"
    wait_for(lambda: logged("saga", "has no stored failure; ignored"), timeout=10, what="the saga worker's log")

    assert database_snapshot() == before
    held.refresh_from_db()
    assert (held.status, held.current_step) == ("running", "reserve_inventory")
    assert Order.objects.get(id=held.order_id).status == "pending"
    # Not a real order: nothing may pick it up later.
    Order.objects.filter(id=held.order_id).delete()
    held.delete()
