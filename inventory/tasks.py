from decimal import Decimal, InvalidOperation
from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from common.exceptions import InvalidMessage
from common.signing import AUTHORITY_KWARG, batch_authority_verify, batch_seal
from common.steps import RedactedReprTask, SealedBatch, require_uuid, saga_step_task

from . import selectors, services


def _price(value: Any, field: str) -> Decimal:
    try:
        price = Decimal(value) if isinstance(value, str) else None
    except InvalidOperation:
        price = None
    if price is None or not price.is_finite() or price < 0:
        raise InvalidMessage(f"message field {field!r} must be a non-negative decimal string, got {value!r}")
    return price


def _lines(ctx: dict[str, Any]) -> list[tuple[str, int, Decimal]]:
    """The order's lines with the unit prices the customer was quoted (order_place)."""
    items = ctx.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidMessage("message field 'items' must be a non-empty list")
    lines = []
    for item in items:
        sku, quantity = (item.get("sku"), item.get("quantity")) if isinstance(item, dict) else (None, None)
        if not isinstance(sku, str) or not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise InvalidMessage(f"malformed order line {str(item)[:200]}")
        lines.append((sku, quantity, _price(item.get("unit_price"), "unit_price")))
    # The charge takes the quoted total (payments.charge): it must be what these lines cost.
    total = _price(ctx.get("total"), "total")
    if total != sum((price * quantity for _, quantity, price in lines), Decimal("0")):
        raise InvalidMessage(f"message field 'total' ({total}) is not the sum of the quoted lines")
    return lines


@saga_step_task("inventory.reserve", phase="forward")
def reserve(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.stock_reserve(
        saga_id=require_uuid(ctx, "saga_id"), order_id=require_uuid(ctx, "order_id"), lines=_lines(ctx)
    )


@saga_step_task("inventory.release", compensation=True, phase="compensation")
def release(ctx: dict[str, Any]) -> dict[str, Any]:
    return services.stock_release(saga_id=require_uuid(ctx, "saga_id"))


@saga_step_task("inventory.check_stock", phase="forward")
def check_stock(ctx: dict[str, Any]) -> dict[str, Any]:
    """place_order version 2's first step: fail before anything is held (reads only)."""
    return selectors.stock_check(saga_id=require_uuid(ctx, "saga_id"), lines=_lines(ctx))


RECORD_SALES = "inventory.record_sales"
# A batch is what one sweep sends (SAGA_SWEEP_BATCH); anything much bigger is not ours.
MAX_BATCH = 10_000


# Its kwargs hold the batch's authority: a retry keeps the redacted reprs (common.steps).
@shared_task(
    name=RECORD_SALES,
    base=RedactedReprTask,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=None,  # the coordinator sends the batch again anyway; retrying is cheaper
)
def record_sales(saga_ids: Any, **kwargs: Any) -> SealedBatch:
    """Confirmed orders' reservations become sales (services.stock_sell), for the batch
    of sagas the coordinator authorised; returns that batch, sealed, for `saga.settled`."""
    if not isinstance(saga_ids, list) or not saga_ids or len(saga_ids) > MAX_BATCH:
        raise InvalidMessage(f"{RECORD_SALES} expects a non-empty list of at most {MAX_BATCH} saga ids")
    ids = [require_uuid({"saga_id": saga_id}, "saga_id") for saga_id in saga_ids]
    batch_authority_verify(kwargs.get(AUTHORITY_KWARG), task=RECORD_SALES, saga_ids=ids)
    sold = services.stock_sell(saga_ids=ids)
    return SealedBatch(batch_seal(task=RECORD_SALES, saga_ids=sold))
