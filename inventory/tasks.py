from typing import Any

from common.exceptions import InvalidMessage
from common.steps import require_uuid, saga_step_task

from . import services


def _lines(ctx: dict[str, Any]) -> list[tuple[str, int]]:
    items = ctx.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidMessage("message field 'items' must be a non-empty list")
    lines = []
    for item in items:
        sku, quantity = (item.get("sku"), item.get("quantity")) if isinstance(item, dict) else (None, None)
        if not isinstance(sku, str) or not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise InvalidMessage(f"malformed order line {str(item)[:200]}")
        lines.append((sku, quantity))
    return lines


@saga_step_task("inventory.reserve", phase="forward")
def reserve(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.stock_reserve(
        saga_id=require_uuid(ctx, "saga_id"), order_id=require_uuid(ctx, "order_id"), lines=_lines(ctx)
    )


@saga_step_task("inventory.release", compensation=True, phase="compensation")
def release(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.stock_release(saga_id=require_uuid(ctx, "saga_id"))
