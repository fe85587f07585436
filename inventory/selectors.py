import uuid
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any

from django.db.models import F, QuerySet

from common.notified_cache import NotifiedCache
from common.sql import prepared

from .exceptions import InsufficientStock, PriceChanged, UnknownProduct
from .models import Product, Reservation

DB = "inventory"  # the catalogue's database (orders_project.db_routers)
_PRICE_FIELDS = ["id", "sku", "name", "price"]
_PRICES = f'SELECT {", ".join(_PRICE_FIELDS)} FROM "{Product._meta.db_table}" WHERE sku = ANY(%s::varchar[])'
# The rows `product_prices` read, by SKU, until a product's SKU, name or price changes
# (inventory/migrations/0005_catalogue_notify.py).
CATALOGUE = NotifiedCache(alias=DB, channel="catalogue")


def product_list() -> QuerySet[Product]:
    return Product.objects.annotate(available_units=F("on_hand") - F("reserved")).order_by("sku")


def product_prices(*, skus: Iterable[str]) -> dict[str, Product]:
    """The catalogue entries for `skus`, by SKU; unknown SKUs are simply absent. Each has its
    id, SKU, name and price, the rest deferred: what
    `Product.objects.filter(sku__in=skus).only("sku", "name", "price")` reads.

    From the process's catalogue cache where it holds them (common.notified_cache: no
    round trip); the others in one prepared statement, kept for the next order. Inside a
    transaction, always from the database. A price read here is a quote, not a promise:
    the reserve step holds stock only at the quoted price (price_changed otherwise).
    """

    def read(missing: list[str]) -> dict[str, Any]:
        with prepared(DB) as cursor:
            cursor.execute(_PRICES, [missing])
            return {row[1]: row for row in cursor.fetchall()}

    rows = CATALOGUE.get_many(skus, read)
    return {sku: Product.from_db(DB, _PRICE_FIELDS, row) for sku, row in rows.items()}


def stock_check(*, saga_id: uuid.UUID, lines: Sequence[tuple[str, int, Decimal]]) -> dict[str, Any]:
    """Whether every line `(sku, quantity, quoted unit price)` could be reserved now: the
    SKU exists, enough is available, the price is still the quoted one. Raises the reserve
    step's own failures (UnknownProduct, InsufficientStock, PriceChanged) otherwise.

    The place-order saga's first step from version 2 (inventory.check_stock): it fails an
    order before anything is held or locked. It only reads, so a repeated or late copy is
    harmless; the reservation after it still decides, under its conditional UPDATE. A copy
    that runs after its saga's reservation (a redelivery, a sweeper's re-publish from this
    step) passes: the stock it would count as taken is its own saga's, and what it checks
    was settled when the reservation was made.
    """
    try:
        return _stock_check(lines)
    except (UnknownProduct, InsufficientStock, PriceChanged):
        if Reservation.objects.filter(saga_id=saga_id).exists():
            return {"checked": sorted({sku for sku, _, _ in lines}), "reserved_already": True}
        raise


def _stock_check(lines: Sequence[tuple[str, int, Decimal]]) -> dict[str, Any]:
    rows = Product.objects.filter(sku__in=[sku for sku, _, _ in lines]).only("sku", "on_hand", "reserved", "price")
    found = {p.sku: p for p in rows}
    if unknown := [sku for sku, _, _ in lines if sku not in found]:
        raise UnknownProduct(f"unknown SKU(s): {', '.join(unknown)}")
    if changed := [(sku, quoted, found[sku].price) for sku, _, quoted in lines if found[sku].price != quoted]:
        moves = " and ".join(f"the price of {sku} changed from {quoted} to {now}" for sku, quoted, now in changed)
        raise PriceChanged(f"price_changed: {moves} since you ordered; nothing was charged")
    if short := [(sku, q) for sku, q, _ in lines if found[sku].on_hand - found[sku].reserved < q]:
        raise InsufficientStock(f"not enough stock for {short[0][0]}: {short[0][1]} requested")
    return {"checked": sorted(found)}
