from decimal import Decimal, InvalidOperation
from typing import Any

from celery import current_task
from django.conf import settings

from common.exceptions import InvalidMessage
from common.steps import require_str, require_uuid, saga_step_task

from . import services


def _amount(ctx: dict[str, Any]) -> Decimal:
    """The quoted total (order_place, signed with the order): what the customer agreed to pay."""
    try:
        amount = Decimal(str(ctx["total"]))
    except (KeyError, InvalidOperation):
        raise InvalidMessage(f"message field 'total' must be a decimal string, got {ctx.get('total')!r}") from None
    if not amount.is_finite() or amount < 0:
        raise InvalidMessage(f"message field 'total' must be a non-negative amount, got {amount}")
    return amount


@saga_step_task("payments.charge", max_retries=5, phase="forward")
def charge(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.payment_charge(
        saga_id=require_uuid(ctx, "saga_id"),
        order_id=require_uuid(ctx, "order_id"),
        amount=_amount(ctx),
        currency=ctx.get("currency") or settings.CURRENCY,
        token=require_str(ctx, "payment_token", max_length=64),
        task_id=current_task.request.id or "",
    )


# A refund may wait for an in-flight charge (tok_slow) until the charge's lease ends: as a
# compensation it retries SAGA_COMPENSATION_MAX_RETRIES times, not a forward step's 5.
@saga_step_task("payments.refund", compensation=True, phase="compensation")
def refund(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.payment_refund(saga_id=require_uuid(ctx, "saga_id"))
