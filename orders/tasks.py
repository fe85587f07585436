from decimal import Decimal, InvalidOperation
from typing import Any

from common.exceptions import InvalidMessage
from common.steps import require_uuid, saga_step_task

from . import services


@saga_step_task("orders.confirm", phase="forward")
def confirm(ctx: dict[str, Any]) -> dict[str, Any]:
    try:
        total = Decimal(str(ctx["total"]))
    except (KeyError, InvalidOperation):
        raise InvalidMessage("message field 'total' must be a decimal string") from None
    return services.order_confirm(
        order_id=require_uuid(ctx, "order_id"),
        saga_id=require_uuid(ctx, "saga_id"),
        total=total,
        timeline=ctx.get("_steps"),
    )


@saga_step_task("orders.fail", compensation=True, phase="compensation")
def fail(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.order_fail(
        order_id=require_uuid(ctx, "order_id"),
        saga_id=require_uuid(ctx, "saga_id"),
        reason=str(ctx.get("failure_reason") or ""),
    )
