"""The saga's steps as plain SQL: what the floor (bench.floor) and the bare chain (bench.bare)
do instead of the services, on the real tables of each service's database.

Each step writes the rows its service writes (inventory: the stock counter and the
reservation; payments: the payment; orders: the order, its line and its status;
notifications: the notification) and nothing of the saga machinery: no processed keys, no
advisory locks, no saga tables, no circuit breaker, no provider ledger. There is no saga, so
the `saga_id` columns hold the order id.

Precondition of every step: `conn` is a psycopg 3 connection in autocommit mode (`connect`).
Each step is one statement, hence exactly one transaction; a caller that wants several steps
in one transaction wraps them in `conn.transaction()`.

`order` is a dict: {"order_id": str (uuid), "email": str, "sku": str, "quantity": int,
"amount": str (decimal), "token": "tok_visa" | "tok_chargeDeclined" | ...}.

Products are not created here: the caller seeds them (inventory.services.product_upsert, or
`setup_catalogue`), one `inventory_product` row per SKU the orders name, with enough stock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import psycopg

Order = dict[str, Any]

# The environment variable naming each service's database URL (orders_project.settings).
DATABASE_URL_VARS = {
    "orders": "ORDERS_DATABASE_URL",
    "inventory": "INVENTORY_DATABASE_URL",
    "payments": "PAYMENTS_DATABASE_URL",
    "notifications": "NOTIFICATIONS_DATABASE_URL",
}
CURRENCY = "USD"  # settings.CURRENCY's default
# The failure reasons the order row and the customer's message give.
DECLINED = "payment declined"
OUT_OF_STOCK = "not enough stock"
# The order row's user: the baselines have no users (the real API authenticates one).
BENCH_USER_ID = 0
# As the fake provider answers them (payments.gateways.fake): these succeed, two codes
# decline, and anything else is declined as an invalid token.
APPROVING_TOKENS = frozenset({"tok_visa", "tok_mastercard", "tok_amex"})
DECLINE_CODES = {"tok_chargeDeclined": "card_declined", "tok_chargeDeclinedInsufficientFunds": "insufficient_funds"}
# notifications.services.MESSAGES, for the two outcomes the baselines reach.
MESSAGES = {
    "confirmed": (
        "order_confirmed",
        "Your order {short} is confirmed",
        "Thank you! Your order {order} is confirmed; we charged {amount} {currency}.",
    ),
    "failed": (
        "order_failed",
        "Your order {short} could not be completed",
        "We could not complete your order {order}: {reason}. You have not been charged.",
    ),
}

# (order_id, finished_at in epoch seconds, outcome) of the orders that reached their end:
# the notification row is the last write of either path. Run it on the notifications
# database with one parameter, a list of order ids (text).
TERMINAL_SQL = (
    "SELECT order_id::text, extract(epoch FROM sent_at)::float8, "
    "CASE kind WHEN 'order_confirmed' THEN 'confirmed' ELSE 'failed' END "
    "FROM notifications_notification WHERE order_id = ANY(%s::uuid[]) AND channel = 'email'"
)


def connect(url: str) -> psycopg.Connection:
    """A connection the steps accept: autocommit, so each one-statement step is its own transaction."""
    return psycopg.connect(url, autocommit=True)


def setup_catalogue(conn: psycopg.Connection, skus: Iterable[str], *, on_hand: int = 1_000_000_000) -> None:
    """Create (or reset) one product per SKU at 10.00 with `on_hand` units and none reserved.

    For tests and the floor on a database nobody seeded; `make bench` seeds the same rows
    with inventory.services.product_upsert instead.
    """
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO inventory_product (sku, name, price, on_hand, reserved, created_at, updated_at) "
            "VALUES (%s, %s, 10.00, %s, 0, now(), now()) "
            "ON CONFLICT (sku) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = 0, updated_at = now()",
            [(sku, f"Bench product {sku}", on_hand) for sku in skus],
        )


def insert_order(conn: psycopg.Connection, order: Order) -> None:
    """Orders DB: the pending order and its one line, as orders.services.order_place writes them
    (without the saga rows, the idempotency key and the catalogue read: the line is named by
    its SKU and priced from `order["amount"]`)."""
    conn.execute(
        "WITH o AS ("
        "  INSERT INTO orders_order (id, user_id, email, phone, payment_token, status, total, currency,"
        "    failure_reason, cancel_requested_at, idempotency_key, request_fingerprint, created_at, updated_at)"
        "  VALUES (%(id)s, %(user)s, %(email)s, '', %(token)s, 'pending', %(amount)s, %(currency)s,"
        "    '', NULL, NULL, '', now(), now())"
        "  RETURNING id"
        ") INSERT INTO orders_orderline (order_id, sku, name, quantity, unit_price)"
        "  SELECT o.id, %(sku)s, %(sku)s, %(quantity)s, %(unit_price)s FROM o",
        {
            "id": order["order_id"],
            "user": BENCH_USER_ID,
            "email": order["email"],
            "token": order["token"],
            "amount": order["amount"],
            "currency": CURRENCY,
            "sku": order["sku"],
            "quantity": order["quantity"],
            "unit_price": Decimal(order["amount"]) / order["quantity"],
        },
    )


def reserve(conn: psycopg.Connection, order: Order) -> bool:
    """Inventory DB: hold the stock and record the reservation at the catalogue price, or
    return False (nothing written) when the SKU lacks the stock or does not exist.

    The conditional UPDATE is what inventory.services.stock_reserve does per line: it never
    oversells, whatever runs concurrently (the row lock serialises two reservations of one
    SKU, and the second re-checks the condition).
    """
    cursor = conn.execute(
        "WITH p AS ("
        "  UPDATE inventory_product SET reserved = reserved + %(quantity)s, updated_at = now()"
        "  WHERE sku = %(sku)s AND on_hand >= reserved + %(quantity)s RETURNING price"
        ") INSERT INTO inventory_reservation (saga_id, order_id, sku, quantity, unit_price, status, created_at)"
        "  SELECT %(id)s, %(id)s, %(sku)s, %(quantity)s, p.price, 'held', now() FROM p",
        {"id": order["order_id"], "sku": order["sku"], "quantity": order["quantity"]},
    )
    return cursor.rowcount == 1


def release(conn: psycopg.Connection, order: Order) -> None:
    """Inventory DB: give back what the order holds and mark its reservations released, as
    inventory.services.stock_release does. Holding nothing, it changes nothing."""
    conn.execute(
        "WITH r AS ("
        "  UPDATE inventory_reservation SET status = 'released', released_at = now()"
        "  WHERE saga_id = %(id)s AND status = 'held' RETURNING sku, quantity"
        ") UPDATE inventory_product p SET reserved = p.reserved - r.quantity, updated_at = now()"
        "  FROM r WHERE p.sku = r.sku",
        {"id": order["order_id"]},
    )


def charge(conn: psycopg.Connection, order: Order) -> bool:
    """Payments DB: the payment row as payments.services.payment_charge leaves it, captured
    (True) or declined with the fake provider's code (False), in one INSERT.

    The provider's decision is made here from the token; its ledger is not written.
    """
    token = order["token"]
    approved = token in APPROVING_TOKENS
    conn.execute(
        "INSERT INTO payments_payment (id, saga_id, order_id, amount, currency, status, decline_code,"
        "  provider_charge_id, created_at, updated_at)"
        " VALUES (%(pk)s, %(id)s, %(id)s, %(amount)s, %(currency)s, %(status)s, %(code)s, %(charge)s,"
        "  now(), now())",
        {
            "pk": uuid.uuid4(),
            "id": order["order_id"],
            "amount": order["amount"],
            "currency": CURRENCY,
            "status": "captured" if approved else "declined",
            "code": "" if approved else DECLINE_CODES.get(token, "invalid_token"),
            "charge": f"ch_{uuid.uuid4().hex[:24]}" if approved else "",
        },
    )
    return approved


def confirm(conn: psycopg.Connection, order: Order) -> None:
    """Orders DB: a pending order becomes confirmed at the charged amount (the pivot)."""
    conn.execute(
        "UPDATE orders_order SET status = 'confirmed', total = %s, updated_at = now() "
        "WHERE id = %s AND status = 'pending'",
        [order["amount"], order["order_id"]],
    )


def fail(conn: psycopg.Connection, order: Order, reason: str = DECLINED) -> None:
    """Orders DB: a pending order becomes failed, with the reason the customer is told."""
    conn.execute(
        "UPDATE orders_order SET status = 'failed', failure_reason = %s, updated_at = now() "
        "WHERE id = %s AND status = 'pending'",
        [reason[:2000], order["order_id"]],
    )


def notify(conn: psycopg.Connection, order: Order, outcome: str, reason: str = DECLINED) -> None:
    """Notifications DB: the email notification of the outcome ("confirmed" or "failed"),
    recorded as sent. The last write of an order, so its `sent_at` is the order's end
    (TERMINAL_SQL). Nothing is delivered: the real service also writes a mail file."""
    kind, subject, body = MESSAGES[outcome]
    order_id = order["order_id"]
    fields = {"order": order_id, "short": order_id[:8], "amount": order["amount"], "currency": CURRENCY}
    conn.execute(
        "INSERT INTO notifications_notification (saga_id, order_id, kind, channel, recipient, subject, body,"
        "  status, created_at, sent_at)"
        " VALUES (%(id)s, %(id)s, %(kind)s, 'email', %(email)s, %(subject)s, %(body)s, 'sent', now(), now())",
        {
            "id": order_id,
            "kind": kind,
            "email": order["email"],
            "subject": subject.format(**fields),
            "body": body.format(**fields, reason=reason),
        },
    )


def finished(conn: psycopg.Connection, order_ids: list[str]) -> dict[str, tuple[float, str]]:
    """order id -> (finished at, epoch seconds; "confirmed" | "failed") for the orders that
    reached their end. `conn`: the notifications database."""
    rows = conn.execute(TERMINAL_SQL, [order_ids]).fetchall()
    return {order_id: (at, outcome) for order_id, at, outcome in rows}
