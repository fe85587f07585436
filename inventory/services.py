"""Inventory writes: reserve and release stock for a saga, idempotently."""

import json
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models import F
from django.utils import timezone

from common.exceptions import InvalidMessage, StepRefused
from common.idempotency import processed_results, saga_lock, step_key
from common.sql import is_step_abort, prepared

from .exceptions import InsufficientStock, PriceChanged, ProductExists, StockBelowReserved, UnknownProduct
from .models import ProcessedKey, Product, Reservation

DB = "inventory"
STEP = "reserve_inventory"
# In the reservation's key, what `stock_release` leaves when it came first.
TOMBSTONE = "tombstone"
PRODUCT, RESERVATION, PROCESSED_KEY = (f'"{m._meta.db_table}"' for m in (Product, Reservation, ProcessedKey))


def stock_reserve(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, lines: Sequence[tuple[str, int, Decimal]]
) -> dict[str, Any]:
    """Hold stock for every line `(sku, quantity, quoted unit price)`, or for none, at the
    price the customer was quoted.

    Idempotent by `<saga>:reserve_inventory:do`; refuses after the release tombstone.
    Stock is taken by one conditional UPDATE (`reserved + q <= on_hand`) over all lines:
    no check-then-act, never an oversell. With several lines their rows are locked first
    in SKU order, so two concurrent orders cannot deadlock. The same UPDATE returns each
    line's catalogue price (read under its row lock): one that differs from the quoted
    price raises `PriceChanged` and the transaction rolls the reservation back, so the
    customer is never charged a price they did not see.

    The first copy does all of that in one statement, one round trip (`_reserve_at_once`);
    a copy that finds the key taken, or stock it cannot take, goes the general way below,
    under the saga lock, which returns the stored result or says what is wrong.
    """
    do_key, undo_key = step_key(saga_id, STEP, "do"), step_key(saga_id, STEP, "undo")
    lines = sorted(lines)
    skus, quantities = [sku for sku, _, _ in lines], [q for _, q, _ in lines]
    if len(set(skus)) != len(skus):
        raise InvalidMessage(f"saga {saga_id}: an order names each SKU once, got {skus}")
    result = {"reserved": [{"sku": sku, "quantity": q} for sku, q, _ in lines]}
    if _reserve_at_once(saga_id=saga_id, order_id=order_id, lines=lines, result=result):
        return result
    connection = connections[DB]
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        processed = processed_results(ProcessedKey, do_key, undo_key)
        if undo_key in processed or TOMBSTONE in processed.get(do_key, {}):
            raise StepRefused(f"saga {saga_id}: stock was already released; not reserving")
        if (done := processed.get(do_key)) is not None:
            return done
        with connection.cursor() as cursor:
            # The key first: a copy's one statement (`_reserve_at_once`) takes no saga lock
            # and may have written it since the read above, or be about to: this insert
            # waits for that copy on the key's unique index, then finds its key.
            cursor.execute(
                f"INSERT INTO {PROCESSED_KEY} (key, result, created_at) VALUES (%s, %s::jsonb, now()) "
                "ON CONFLICT (key) DO NOTHING RETURNING 1",
                [do_key, json.dumps(result)],
            )
            if cursor.fetchone() is None:
                processed = processed_results(ProcessedKey, do_key, undo_key)
                if undo_key in processed or TOMBSTONE in processed.get(do_key, {}):
                    raise StepRefused(f"saga {saga_id}: stock was already released; not reserving")
                return processed[do_key]  # the racing copy reserved
            if len(lines) > 1:
                cursor.execute(f"SELECT 1 FROM {PRODUCT} WHERE sku = ANY(%s) ORDER BY sku FOR UPDATE", [skus])
            cursor.execute(
                f"UPDATE {PRODUCT} AS p SET reserved = p.reserved + w.q, updated_at = now() "
                "FROM unnest(%s::varchar[], %s::integer[]) AS w(sku, q) "
                "WHERE p.sku = w.sku AND p.on_hand >= p.reserved + w.q RETURNING p.sku, p.price",
                [skus, quantities],
            )
            prices: dict[str, Decimal] = dict(cursor.fetchall())
            # Raising rolls back what the UPDATE took: no reservation at a stale price.
            if changed := [(sku, quoted, prices[sku]) for sku, _, quoted in lines if prices.get(sku, quoted) != quoted]:
                raise PriceChanged(_price_changed_reason(changed))
            if len(prices) < len(lines):
                _refuse_reservation(cursor, [(sku, q) for sku, q, _ in lines], prices)
            # The reservations (the key is written above, in this transaction).
            cursor.execute(
                f"INSERT INTO {RESERVATION} (saga_id, order_id, sku, quantity, unit_price, status, created_at) "
                "SELECT %s, %s, w.sku, w.q, w.price, %s, now() "
                "FROM unnest(%s::varchar[], %s::integer[], %s::numeric[]) AS w(sku, q, price)",
                [saga_id, order_id, Reservation.Status.HELD, skus, quantities, [quoted for _, _, quoted in lines]],
            )
    return result


def _reserve_at_once(
    *, saga_id: uuid.UUID, order_id: uuid.UUID, lines: Sequence[tuple[str, int, Decimal]], result: dict[str, Any]
) -> bool:
    """The first copy's reservation in one statement: the key, then every line at its
    quoted price, then the reservations. True if it reserved; False if the key is taken
    (a copy or the release's tombstone got there first) or a line could not be reserved,
    in which case nothing was written (`saga_step_abort` undoes the statement).

    No saga lock: the key's unique index serialises copies (a racing insert waits for this
    statement, then finds the key), and `stock_release` writes its tombstone into this same
    key, so a release and this statement wait for each other the same way. Products are
    locked in SKU order (`locked`), as the general path does.
    """
    skus = [sku for sku, _, _ in lines]
    try:
        with prepared(DB) as cursor:
            cursor.execute(
                "WITH w AS (SELECT * FROM unnest(%s::varchar[], %s::integer[], %s::numeric[]) AS w(sku, q, price)), "
                f"guard AS (INSERT INTO {PROCESSED_KEY} (key, result, created_at) "
                f"SELECT %s, %s::jsonb, now() WHERE NOT EXISTS (SELECT 1 FROM {PROCESSED_KEY} WHERE key = %s) "
                "ON CONFLICT (key) DO NOTHING RETURNING 1), "
                f"locked AS MATERIALIZED (SELECT sku FROM {PRODUCT} WHERE sku = ANY(%s) "
                "AND EXISTS (SELECT 1 FROM guard) ORDER BY sku FOR UPDATE), "
                f"taken AS (UPDATE {PRODUCT} AS p SET reserved = p.reserved + w.q, updated_at = now() "
                "FROM w JOIN locked USING (sku) "
                "WHERE p.sku = w.sku AND p.on_hand >= p.reserved + w.q AND p.price = w.price RETURNING p.sku), "
                f"held AS (INSERT INTO {RESERVATION} "
                "(saga_id, order_id, sku, quantity, unit_price, status, created_at) "
                "SELECT %s, %s, w.sku, w.q, w.price, %s, now() FROM w JOIN taken USING (sku)) "
                "SELECT CASE WHEN (SELECT count(*) FROM taken) = %s THEN EXISTS (SELECT 1 FROM guard) "
                "ELSE saga_step_abort('a line could not be reserved') END",
                [
                    skus,
                    [q for _, q, _ in lines],
                    [price for _, _, price in lines],
                    step_key(saga_id, STEP, "do"),
                    json.dumps(result),
                    step_key(saga_id, STEP, "undo"),
                    skus,
                    saga_id,
                    order_id,
                    Reservation.Status.HELD,
                    len(lines),
                ],
            )
            return bool(cursor.fetchone()[0])
    except DatabaseError as error:
        if is_step_abort(error):
            return False
        raise


def _price_changed_reason(changed: Sequence[tuple[str, Decimal, Decimal]]) -> str:
    """What the customer reads (the order's failure reason): which prices moved, from what to what."""
    moves = " and ".join(f"the price of {sku} changed from {quoted} to {now}" for sku, quoted, now in changed)
    return f"price_changed: {moves} since you ordered; nothing was charged"


def _refuse_reservation(cursor: Any, lines: Sequence[tuple[str, int]], reserved: Mapping[str, Decimal]) -> None:
    """Raise why the reservation failed: an unknown SKU, or not enough stock (the caller's
    transaction rolls back whatever the UPDATE took)."""
    cursor.execute(f"SELECT sku FROM {PRODUCT} WHERE sku = ANY(%s)", [[sku for sku, _ in lines]])
    known = {sku for (sku,) in cursor.fetchall()}
    if unknown := [sku for sku, _ in lines if sku not in known]:
        raise UnknownProduct(f"unknown SKU(s): {', '.join(unknown)}")
    short = next(f"{sku}: {q} requested" for sku, q in lines if sku not in reserved)
    raise InsufficientStock(f"not enough stock for {short}")


def stock_release(*, saga_id: uuid.UUID) -> dict[str, Any]:
    """Give back whatever the saga holds. With nothing held, leave a tombstone.

    Idempotent by `<saga>:reserve_inventory:undo`, under the saga lock: a copy that comes
    second waits for the first, then returns its result. Three statements in one
    transaction, where the ORM took eight and one more per line (BENCHMARKS.md):
    1. the saga lock;
    2. the tombstone in the reservation's own key, and the undo key's result if a copy
       recorded one. A reservation that takes no saga lock (`_reserve_at_once`) and is
       committing now is waited for here (the unique index); one that comes later finds
       the key taken and refuses;
    3. the release: the saga's held reservations (locked, in SKU order, as a reservation
       locks its products), their products' `reserved`, and the undo key with what was
       released. It must be a statement of its own: it reads with a snapshot taken after
       statement 2's wait, so it sees the reservation that wait was for.
    """
    undo_key = step_key(saga_id, STEP, "undo")
    with transaction.atomic(using=DB):
        saga_lock(using=DB, saga_id=saga_id)
        with prepared(DB) as cursor:
            cursor.execute(
                f"WITH tomb AS (INSERT INTO {PROCESSED_KEY} (key, result, created_at) "
                "VALUES (%s, %s::jsonb, now()) ON CONFLICT (key) DO NOTHING) "
                f"SELECT result FROM {PROCESSED_KEY} WHERE key = %s",
                [step_key(saga_id, STEP, "do"), json.dumps({TOMBSTONE: "released"}), undo_key],
            )
            if (done := cursor.fetchone()) is not None:
                return done[0] if isinstance(done[0], dict) else json.loads(done[0])
            cursor.execute(
                "WITH held AS MATERIALIZED ("
                f"SELECT id, sku, quantity FROM {RESERVATION} WHERE saga_id = %s AND status = %s "
                "ORDER BY sku FOR UPDATE), "
                f"locked AS MATERIALIZED (SELECT p.sku FROM {PRODUCT} AS p JOIN held USING (sku) "
                "ORDER BY p.sku FOR UPDATE OF p), "
                f"given AS (UPDATE {PRODUCT} AS p SET reserved = p.reserved - held.quantity, updated_at = now() "
                "FROM held JOIN locked USING (sku) WHERE p.sku = held.sku), "
                f"released AS (UPDATE {RESERVATION} AS r SET status = %s, released_at = now() "
                "FROM held WHERE r.id = held.id), "
                f"recorded AS (INSERT INTO {PROCESSED_KEY} (key, result, created_at) "
                "SELECT %s, jsonb_build_object('released', COALESCE(jsonb_agg("
                "jsonb_build_object('sku', sku, 'quantity', quantity) ORDER BY sku), '[]'::jsonb)), now() FROM held) "
                "SELECT sku, quantity FROM held ORDER BY sku",
                [saga_id, Reservation.Status.HELD, Reservation.Status.RELEASED, undo_key],
            )
            held = cursor.fetchall()
    return {"released": [{"sku": sku, "quantity": quantity} for sku, quantity in held]}


def stock_sell(*, saga_ids: Sequence[uuid.UUID]) -> list[str]:
    """Turn the held reservations of confirmed orders' sagas into sales: each leaves
    stock (`on_hand` and `reserved` both fall by its quantity); return the sagas given,
    none of which holds anything any more.

    Precondition: every saga in `saga_ids` passed its pivot (its order is confirmed), so
    no compensation will ever release its reservation; the coordinator's authority for
    the batch says so (inventory.tasks.record_sales). A SOLD reservation is never
    released (`stock_release` gives back HELD ones only).

    One statement, no processed key: idempotent by the reservation's status. Its rows are
    locked in id order and its products in SKU order (as a reservation and a release lock
    them), and a racing copy of the same batch waits on those row locks, then finds them
    no longer HELD and sells nothing (READ COMMITTED re-checks the condition on the row
    it waited for). The CHECK `reserved <= on_hand` holds throughout: both fall together.
    Planned for its sagas at every execution: it locks reservations, a table that grows,
    by a key array (common.sql.prepared).
    """
    with prepared(DB, plan_once=False) as cursor:
        cursor.execute(
            "WITH mine AS MATERIALIZED ("
            f"SELECT id FROM {RESERVATION} WHERE saga_id = ANY(%s::uuid[]) AND status = %s ORDER BY id FOR UPDATE), "
            f"sold AS (UPDATE {RESERVATION} AS r SET status = %s, sold_at = now() FROM mine "
            "WHERE r.id = mine.id RETURNING r.sku, r.quantity), "
            "by_sku AS MATERIALIZED (SELECT sku, sum(quantity)::integer AS q FROM sold GROUP BY sku), "
            f"locked AS MATERIALIZED (SELECT p.sku FROM {PRODUCT} AS p JOIN by_sku USING (sku) "
            "ORDER BY p.sku FOR UPDATE OF p) "
            f"UPDATE {PRODUCT} AS p SET on_hand = p.on_hand - b.q, reserved = p.reserved - b.q, updated_at = now() "
            "FROM by_sku AS b JOIN locked USING (sku) WHERE p.sku = b.sku",
            [[str(saga_id) for saga_id in saga_ids], Reservation.Status.HELD, Reservation.Status.SOLD],
        )
    return [str(saga_id) for saga_id in saga_ids]


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


def product_create(*, sku: str, name: str, price: Decimal, on_hand: int) -> Product:
    """Add a new product to the catalogue with its first stock (the admin's "add").

    Raises `ProductExists` (nothing changes) if the SKU exists: two operators adding the
    same SKU at once both pass the form's check, and the second must not overwrite the
    first one's stock (`product_update` adds to it instead).
    """
    try:
        with transaction.atomic(using=DB):
            return Product.objects.create(sku=sku, name=name, price=price, on_hand=on_hand)
    except IntegrityError:
        raise ProductExists(f"{sku} exists already: add its stock from its own page") from None


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
