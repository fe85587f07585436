from typing import Any

from common.exceptions import InvalidMessage
from common.steps import require_str, require_uuid, saga_step_task

from . import services


@saga_step_task("notifications.notify", compensation=True)
def notify(ctx: dict[str, Any]) -> dict[str, Any]:
    outcome = ctx.get("outcome")
    if outcome not in services.OUTCOME_KINDS:
        raise InvalidMessage(f"message field 'outcome' must be one of {sorted(services.OUTCOME_KINDS)}")
    return services.notification_send(
        saga_id=require_uuid(ctx, "saga_id"),
        order_id=require_uuid(ctx, "order_id"),
        outcome=outcome,
        email=require_str(ctx, "email", max_length=254),
        phone=str(ctx.get("phone") or ""),
        amount=str(ctx.get("total") or ""),  # the quoted total is what was charged
        currency=str(ctx.get("currency") or ""),
        reason=str(ctx.get("failure_reason") or ""),
    )
