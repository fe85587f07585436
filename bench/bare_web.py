"""The bare baseline's API: `POST /orders/` inserts the order and publishes its bare chain.

A plain WSGI app (no Django, no DRF, no authentication, no throttle, no catalogue read), so
the bare baseline pays an HTTP request per order as the real API does, and little else.
Run it with the product's gunicorn options (Procfile `web`):

    ORDERS_DATABASE_URL=... CELERY_BROKER_URL=... \\
    gunicorn bench.bare_web:app --bind 127.0.0.1:8001 --workers 2 --threads 4 --access-logfile - --graceful-timeout 5

Request: {"email", "sku", "quantity", "payment_token", "amount"? (default "10.00"), "id"?
(a UUID the client chose; default a new one)}. Answer: 202 {"id": order id}, 400 with
{"detail"} for a body it cannot use, 409 for an id that exists, 503 when the orders
database or the broker is away.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from kombu.exceptions import OperationalError as BrokerError

from . import bare, sql

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # the product's DATA_UPLOAD_MAX_MEMORY_SIZE default
MAX_QUANTITY = 1000  # the product's ORDER_MAX_QUANTITY default
TOKEN = re.compile(r"^tok_[A-Za-z0-9_]{1,60}$")  # orders.api.serializers.TOKEN_PATTERN
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class BadRequest(ValueError):
    pass


def order_from(data: Any) -> dict[str, Any]:
    """The bench.sql order a request body describes; BadRequest when it describes none."""
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object")
    email, sku, quantity, token = (data.get(k) for k in ("email", "sku", "quantity", "payment_token"))
    if not isinstance(email, str) or not EMAIL.match(email):
        raise BadRequest("email: a valid address is required")
    if not isinstance(sku, str) or not 0 < len(sku) <= 64:
        raise BadRequest("sku: 1 to 64 characters")
    if type(quantity) is not int or not 0 < quantity <= MAX_QUANTITY:
        raise BadRequest(f"quantity: an integer from 1 to {MAX_QUANTITY}")
    if not isinstance(token, str) or not TOKEN.match(token):
        raise BadRequest("payment_token: a token such as tok_visa")
    try:
        amount = Decimal(str(data.get("amount", "10.00")))
        order_id = str(uuid.UUID(str(data["id"]))) if "id" in data else str(uuid.uuid4())
    except (InvalidOperation, ValueError):
        raise BadRequest("amount: a decimal string; id: a UUID") from None
    if not amount.is_finite() or not 0 <= amount < 10**10:
        raise BadRequest("amount: a decimal string from 0")
    return {
        "order_id": order_id,
        "email": email,
        "sku": sku,
        "quantity": quantity,
        "amount": str(amount),
        "token": token,
    }


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
    return [payload]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    if environ.get("PATH_INFO") != "/orders/":
        return _json(start_response, "404 Not Found", {"detail": "not found"})
    if environ.get("REQUEST_METHOD") != "POST":
        return _json(start_response, "405 Method Not Allowed", {"detail": "POST only"})
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        return _json(start_response, "400 Bad Request", {"detail": f"a JSON body of at most {MAX_BODY} bytes"})
    try:
        order = order_from(json.loads(environ["wsgi.input"].read(length)))
    except (BadRequest, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _json(start_response, "400 Bad Request", {"detail": str(error)})
    try:
        # Committed before the chain is published (autocommit), so no step can miss the row.
        sql.insert_order(bare.db("orders"), order)
    except psycopg.errors.UniqueViolation:
        return _json(start_response, "409 Conflict", {"detail": "an order with this id exists"})
    except psycopg.OperationalError as error:
        # This thread's connection is replaced on the next request (bare.db).
        logger.warning("orders database: %s", error)
        return _json(start_response, "503 Service Unavailable", {"detail": "orders database unavailable"})
    try:
        bare.submit(order)
    except BrokerError as error:
        # The order stays pending, as a real API's would whose publish failed after commit.
        logger.warning("broker: %s", error)
        return _json(start_response, "503 Service Unavailable", {"detail": "broker unavailable"})
    return _json(start_response, "202 Accepted", {"id": order["order_id"]})
