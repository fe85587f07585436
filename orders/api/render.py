"""The order's API body, written out: what `OrderOutput` (serializers.py) renders, field for
field, at a fraction of its CPU.

A DRF serializer deep-copies its declared fields for every instance it renders (and each
order's saga is a serializer of its own), which cost the web a tenth of its CPU per
placed order (BENCHMARKS.md). `OrderOutput` stays the API's declaration (the OpenAPI
schema is built from it), and orders/tests/test_render.py checks that the two agree on
every kind of order.
"""

from typing import Any

from rest_framework import serializers

from saga.models import SagaInstance, SagaStep, StepStatus

from ..failure_text import customer_reason, error_kind
from ..models import Order

# Unbound fields: their to_representation reads only settings, so one of each serves all.
_TIME = serializers.DateTimeField()
_TOTAL = serializers.DecimalField(max_digits=12, decimal_places=2)
_PRICE = serializers.DecimalField(max_digits=10, decimal_places=2)


# A step's status as the API shows it: the stored one, or this for a pending step that will
# not run (SagaStep.not_run_because), which `pending` would promise is still to come.
NOT_RUN = "not_run"
STEP_STATUSES = [*StepStatus.choices, (NOT_RUN, "Not run")]


def step_status(step: SagaStep, saga: SagaInstance) -> str:
    """What the API says of `step` of `saga`."""
    return NOT_RUN if step.not_run_because(saga) else str(step.status)


def _time(value: Any) -> Any:
    return None if value is None else _TIME.to_representation(value)


def _choice(value: Any) -> Any:
    return value if value in ("", None) else str(value)


def order_body(order: Order, saga: SagaInstance | None) -> dict[str, Any]:
    """`OrderOutput(order, context={"sagas": {order.id: saga}}).data`, as a plain dict."""
    return {
        "id": str(order.id),
        "status": _choice(order.status),
        "email": str(order.email),
        "phone": str(order.phone),
        "items": [
            {
                "sku": str(line.sku),
                "name": str(line.name),
                "quantity": int(line.quantity),
                "unit_price": _PRICE.to_representation(line.unit_price),
            }
            for line in order.lines.all()
        ],
        "total": _TOTAL.to_representation(order.total),
        "currency": str(order.currency),
        "failure_reason": str(order.failure_reason),
        "cancel_requested": order.cancel_requested_at is not None,
        "created_at": _time(order.created_at),
        "updated_at": _time(order.updated_at),
        "saga": None if saga is None else saga_body(saga),
    }


def saga_body(saga: SagaInstance) -> dict[str, Any]:
    """`SagaOutput(saga).data`, as a plain dict."""
    return {
        "id": str(saga.id),
        "status": _choice(saga.status),
        "current_step": str(saga.current_step),
        "failure_step": str(saga.failure_step),
        "failure_reason": customer_reason(saga.failure_type) if saga.failure_type else "",
        "created_at": _time(saga.created_at),
        "finished_at": _time(saga.finished_at),
        "steps": [
            {
                "name": str(step.name),
                "phase": _choice(step.phase),
                "status": step_status(step, saga),
                "attempts": int(step.attempts),
                "queued_at": _time(step.queued_at),
                "started_at": _time(step.started_at),
                "finished_at": _time(step.finished_at),
                "last_error": error_kind(step.last_error),
                "celery_task_id": str(step.celery_task_id),
            }
            for step in saga.steps.all()
        ],
    }
