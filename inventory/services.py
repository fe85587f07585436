"""Inventory writes: reserve and release stock for a saga, idempotently."""

import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from common.exceptions import StepRefused
from common.idempotency import processed_record, processed_result, processed_results, saga_lock, step_key

from .exceptions import InsufficientStock, StockBelowReserved, UnknownProduct
from .models import ProcessedKey, Product, Reservation

DB = "inventory"
STEP = "reserve_inventory"


def stock_reserve(*, saga_id: uuid.UUID, order_id: uuid.UUID, lines: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Hold stock for every line, or for none, and price the order from the catalogue.

    Idempotent by `<saga>:reserve_inventory:do`; refuses after the release tombstone.
    Each line is one conditional UPDATE (`reserved + q <= on_hand`), taken in SKU order
    so two concurrent orders cannot deadlock: no check-then-act, never an oversell.
    """
    do_key, undo_key = step_key(saga_id, STEP, "do"), step_key(saga_id, STEP, "undo")
    lines = sorted(lines)
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        processed = processed_results(ProcessedKey, do_key, undo_key)
        if (done := processed.get(do_key)) is not None:
            return done
        if undo_key in processed:
            raise StepRefused(f"saga {saga_id}: stock was already released; not reserving")
        products = {p.sku: p for p in Product.objects.filter(sku__in=[sku for sku, _ in lines])}
        unknown = [sku for sku, _ in lines if sku not in products]
        if unknown:
            raise UnknownProduct(f"unknown SKU(s): {', '.join(unknown)}")
        for sku, quantity in lines:
            updated = Product.objects.filter(sku=sku, on_hand__gte=F("reserved") + quantity).update(
                reserved=F("reserved") + quantity, updated_at=timezone.now()
            )
            if not updated:
                raise InsufficientStock(f"not enough stock for {sku}: {quantity} requested")
        Reservation.objects.bulk_create(
            Reservation(saga_id=saga_id, order_id=order_id, sku=sku, quantity=q, unit_price=products[sku].price)
            for sku, q in lines
        )
        amount = sum((products[sku].price * q for sku, q in lines), Decimal("0"))
        result = {"amount": str(amount), "reserved": [{"sku": sku, "quantity": q} for sku, q in lines]}
        processed_record(ProcessedKey, do_key, result)
    return result


def stock_release(*, saga_id: uuid.UUID) -> dict[str, Any]:
    """Give back whatever the saga holds. With nothing held, leave a tombstone.

    Idempotent by `<saga>:reserve_inventory:undo`.
    """
    undo_key = step_key(saga_id, STEP, "undo")
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        if (done := processed_result(ProcessedKey, undo_key)) is not None:
            return done
        held = list(
            Reservation.objects.select_for_update()
            .filter(saga_id=saga_id, status=Reservation.Status.HELD)
            .order_by("sku")
        )
        now = timezone.now()
        for reservation in held:
            Product.objects.filter(sku=reservation.sku).update(
                reserved=F("reserved") - reservation.quantity, updated_at=now
            )
        Reservation.objects.filter(pk__in=[r.pk for r in held]).update(
            status=Reservation.Status.RELEASED, released_at=now
        )
        result = {"released": [{"sku": r.sku, "quantity": r.quantity} for r in held]}
        processed_record(ProcessedKey, undo_key, result)
    return result


def product_upsert(*, sku: str, name: str, price: Decimal, on_hand: int) -> Product:
    """Create a product or set its catalogue data and stock (seeding, tests, admin).

    Refuses to set `on_hand` below what is reserved.
    """
    with transaction.atomic(using=DB):
        product, _ = Product.objects.select_for_update().get_or_create(
            sku=sku, defaults={"name": name, "price": price, "on_hand": on_hand}
        )
        if on_hand < product.reserved:
            raise ValueError(f"{sku}: on_hand {on_hand} is below the {product.reserved} units reserved")
        product.name, product.price, product.on_hand = name, price, on_hand
        product.save()
    return product


def product_update(*, sku: str, name: str, price: Decimal, on_hand_delta: int = 0) -> Product:
    """Change a product's catalogue data, and add (goods received) or remove (a count
    correction, a write-off) units on hand.

    One conditional UPDATE (`on_hand + delta >= reserved`), so it never races with a
    reservation: what orders hold stays held and `available` never goes negative; two
    operators adjusting at once both count. Raises `StockBelowReserved` (nothing changes)
    if on hand would fall below what is reserved, `Product.DoesNotExist` for an unknown SKU.
    """
    with transaction.atomic(using=DB):
        updated = Product.objects.filter(sku=sku, on_hand__gte=F("reserved") - on_hand_delta).update(
            name=name, price=price, on_hand=F("on_hand") + on_hand_delta, updated_at=timezone.now()
        )
        product = Product.objects.get(sku=sku)
    if not updated:
        raise StockBelowReserved(
            f"{sku}: {on_hand_delta:+d} would leave {product.on_hand + on_hand_delta} on hand, below the "
            f"{product.reserved} units orders hold"
        )
    return product
