"""The web's caches emptied by NOTIFY (common.notified_cache): the catalogue's prices and
the API tokens, against the real databases with committed writes, in this process (its
own listener threads). No workers: what is checked is when a cached row may be used."""

import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections, transaction
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from common.notified_cache import NotifiedCache
from common.sql import PreparedCursor
from common.tokens import TOKENS, ApiTokenAuthentication, api_token_create
from devstack.topology import wait_for
from inventory.selectors import CATALOGUE, product_prices

from .api import make_product


@pytest.fixture
def statements(db_access: None, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prepared statements this process sends (the caches' misses), as they are sent."""
    sent: list[str] = []
    execute = PreparedCursor.execute

    def recorded(cursor: PreparedCursor, sql: str, params: Any = ()) -> None:
        sent.append(sql)
        execute(cursor, sql, params)

    monkeypatch.setattr(PreparedCursor, "execute", recorded)
    return sent


def _live(cache: NotifiedCache) -> None:
    cache.lookup([])  # starts this process's listener
    wait_for(lambda: cache.live, timeout=30, what=f"the {cache.channel} listener to listen")


def _sql(alias: str, statement: str, params: Any = ()) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(statement, params)


@pytest.fixture
def sku(db_access: None) -> str:
    sku = f"T-{uuid.uuid4().hex[:10].upper()}"
    make_product(sku, on_hand=10, price="10.00")
    return sku


def test_a_price_read_twice_is_read_from_the_database_once(sku: str, statements: list[str]) -> None:
    _live(CATALOGUE)
    assert product_prices(skus=[sku])[sku].price == Decimal("10.00")
    assert product_prices(skus=[sku])[sku].price == Decimal("10.00")
    assert len(statements) == 1


def test_a_price_changed_by_any_writer_is_read_again(sku: str, statements: list[str]) -> None:
    _live(CATALOGUE)
    product_prices(skus=[sku])
    # Not through the services: plain SQL, as a migration or a script would.
    _sql("inventory", "UPDATE inventory_product SET price = 12.00 WHERE sku = %s", [sku])

    wait_for(lambda: product_prices(skus=[sku])[sku].price == Decimal("12.00"), timeout=10, what="the new price")


def test_stock_moving_keeps_the_prices_cached(sku: str, statements: list[str]) -> None:
    """A reservation updates its product's stock on every order: that must not empty the
    cache, or it would never hold anything under load."""
    _live(CATALOGUE)
    product_prices(skus=[sku])
    generation = CATALOGUE.lookup([])[1]
    _sql(
        "inventory",
        "UPDATE inventory_product SET reserved = reserved + 1, on_hand = on_hand + 1 WHERE sku = %s",
        [sku],
    )
    # Nor does an update that writes every column with the same SKU, name and price (the ORM's save).
    _sql("inventory", "UPDATE inventory_product SET price = price, name = name, sku = sku WHERE sku = %s", [sku])
    # A notification that did come would have been delivered before this one's.
    other = f"T-{uuid.uuid4().hex[:10].upper()}"
    make_product(other, on_hand=1, price="1.00")
    _sql("inventory", "UPDATE inventory_product SET price = 2.00 WHERE sku = %s", [other])
    wait_for(lambda: CATALOGUE.lookup([])[1] != generation, timeout=10, what="the other product's notification")

    assert CATALOGUE.lookup([sku])[0] == {}  # emptied by the other product's price, once
    statements.clear()
    product_prices(skus=[sku])
    product_prices(skus=[sku])
    assert len(statements) == 1


def test_a_read_that_began_before_a_notification_is_not_kept(sku: str) -> None:
    """A read that raced a commit: it looked, then the price changed and was notified, then
    it would have stored what it had read before the change."""
    _live(CATALOGUE)
    _, ticket = CATALOGUE.lookup([sku])
    old = {sku: ("stale row",)}
    _sql("inventory", "UPDATE inventory_product SET price = 11.00 WHERE sku = %s", [sku])
    wait_for(lambda: CATALOGUE.lookup([])[1] != ticket, timeout=10, what="the notification")

    assert CATALOGUE.fill(ticket, old) is False
    assert product_prices(skus=[sku])[sku].price == Decimal("11.00")


def test_inside_a_transaction_the_database_is_read(sku: str, statements: list[str]) -> None:
    _live(CATALOGUE)
    product_prices(skus=[sku])
    statements.clear()
    with transaction.atomic(using="inventory"):
        _sql("inventory", "UPDATE inventory_product SET price = 13.00 WHERE sku = %s", [sku])
        # This transaction's own write, which no notification has announced yet.
        assert product_prices(skus=[sku])[sku].price == Decimal("13.00")
        transaction.set_rollback(True, using="inventory")
    assert len(statements) == 1


def test_a_lost_listener_turns_the_cache_off_until_it_listens_again(sku: str, statements: list[str]) -> None:
    _live(CATALOGUE)
    product_prices(skus=[sku])
    _, before = CATALOGUE.lookup([])
    _sql(
        "inventory",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = 'cache listener: catalogue' AND datname = current_database() "
        "AND pid <> pg_backend_pid()",
    )
    # Off (no ticket: every read goes to the database) until the listener is back, which
    # starts afresh: what it held may have changed unannounced meanwhile.
    wait_for(lambda: (t := CATALOGUE.lookup([])[1]) is not None and t != before, timeout=30, what="the listener back")
    assert CATALOGUE.lookup([sku])[0] == {}
    statements.clear()
    product_prices(skus=[sku])
    product_prices(skus=[sku])
    assert len(statements) == 1


@pytest.fixture
def token(db_access: None) -> Iterator[tuple[Any, str]]:
    user = get_user_model().objects.create_user(username=f"user-{uuid.uuid4().hex[:12]}")
    _, key = api_token_create(user=user)
    yield user, key


def _authenticate(key: str) -> Any:
    request = APIRequestFactory().get("/api/orders/", HTTP_AUTHORIZATION=f"Token {key}")
    return ApiTokenAuthentication().authenticate(request)[0]


def _refused(key: str) -> bool:
    try:
        _authenticate(key)
    except AuthenticationFailed:
        return True
    return False


def test_a_token_used_twice_is_read_from_the_database_once(token: tuple[Any, str], statements: list[str]) -> None:
    user, key = token
    _live(TOKENS)
    first, second = _authenticate(key), _authenticate(key)
    assert first.pk == second.pk == user.pk
    assert first is not second  # nothing one request caches on its user reaches the next
    assert len(statements) == 1


@pytest.mark.parametrize(
    "change",
    [
        "DELETE FROM common_apitoken WHERE user_id = %s",
        "UPDATE common_apitoken SET expires_at = now() - interval '1 second' WHERE user_id = %s",
        "UPDATE auth_user SET is_active = false WHERE id = %s",
    ],
    ids=["revoked", "expired", "deactivated"],
)
def test_a_token_revoked_or_its_user_disabled_by_any_writer_is_refused(
    token: tuple[Any, str], change: str, statements: list[str]
) -> None:
    user, key = token
    _live(TOKENS)
    _authenticate(key)
    _authenticate(key)
    assert len(statements) == 1  # cached

    _sql("default", change, [user.pk])

    wait_for(lambda: _refused(key), timeout=10, what="the token refused")
