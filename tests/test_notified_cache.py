"""The web's caches emptied by NOTIFY (common.notified_cache): the catalogue's prices and
the API tokens, against the real databases with committed writes, in this process (its
own listener threads). No workers: what is checked is when a cached row may be used."""

import os
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections, transaction
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.test import APIRequestFactory

from common import notified_cache
from common.notified_cache import NotifiedCache
from common.sql import PreparedCursor
from common.tokens import TOKENS, ApiTokenAuthentication, api_token_create
from devstack.topology import wait_for
from inventory.selectors import CATALOGUE, product_prices

from .api import make_product

pytestmark = pytest.mark.skipif(not settings.NOTIFIED_CACHES, reason="NOTIFIED_CACHES is off: nothing is cached")


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


def _notifications(alias: str, channel: str, *changes: tuple[str, list[Any]]) -> int:
    """How many notifications on `channel` the `changes` (each its own transaction) sent,
    counted on a listening connection of the test's own, up to a marker sent after them:
    notifications arrive in commit order, so the marker comes after every one of theirs."""
    with notified_cache.listen_connection(alias, channel) as listener:
        listener.execute(f"LISTEN {channel}")
        for statement, params in changes:
            _sql(alias, statement, params)
        _sql(alias, "SELECT pg_notify(%s, 'probe:marker')", [channel])
        count = 0
        for notification in listener.notifies(timeout=10):
            if notification.payload == "probe:marker":
                return count
            count += not notification.payload.startswith("probe:")  # not a listener's probe
    raise AssertionError("the marker never came")


def test_stock_moving_keeps_the_prices_cached(sku: str) -> None:
    """A reservation updates its product's stock on every order: that must not empty the
    cache, or it would never hold anything under load."""
    moved = ("UPDATE inventory_product SET reserved = reserved + 1, on_hand = on_hand + 1 WHERE sku = %s", [sku])
    # Nor does an update that writes every column with the same SKU, name and price (the ORM's save).
    saved = ("UPDATE inventory_product SET price = price, name = name, sku = sku WHERE sku = %s", [sku])
    assert _notifications("inventory", "catalogue", moved, saved) == 0
    repriced = ("UPDATE inventory_product SET price = 2.00 WHERE sku = %s", [sku])
    renamed = ("UPDATE inventory_product SET name = 'Renamed' WHERE sku = %s", [sku])
    assert _notifications("inventory", "catalogue", repriced, renamed) == 2


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
    listens = CATALOGUE.listens
    # This process's listener only: the test web's are not this test's to cut.
    _sql(
        "inventory",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = %s AND pid <> pg_backend_pid()",
        [f"cache listener: catalogue (pid {os.getpid()})"],
    )
    # Off (no ticket: every read goes to the database) until the listener is back, which
    # starts afresh: what it held may have changed unannounced meanwhile.
    wait_for(lambda: CATALOGUE.listens > listens and CATALOGUE.live, timeout=30, what="the listener back")
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


def test_a_listener_that_hears_nothing_reconnects(db_access: None) -> None:
    """Behind a pooler in transaction mode LISTEN stays on a server connection the client
    has let go of: the connection answers, but nothing arrives. The listener's probe finds
    that out: the cache never goes live, and the listener keeps trying."""
    connects: list[float] = []

    def deaf(alias: str, channel: str) -> psycopg.Connection:
        connects.append(time.monotonic())
        connection = listen_connection(alias, channel)
        execute = connection.execute

        def execute_but_listen(statement: Any, *args: Any, **kwargs: Any) -> Any:
            if str(statement).startswith("LISTEN"):
                return None  # the pooler ran it on a server connection this client let go of
            return execute(statement, *args, **kwargs)

        connection.execute = execute_but_listen  # type: ignore[method-assign]
        return connection

    listen_connection = notified_cache.listen_connection
    cache = NotifiedCache(alias="inventory", channel="test_deaf", poll_seconds=0.2, probe_seconds=0.5, connect=deaf)
    try:
        assert cache.lookup([]) == ({}, None)
        # Each try connects twice: the listening connection and the one that probes it.
        wait_for(lambda: len(connects) >= 6, timeout=30, what="the deaf listener to try a third time")
        assert (cache.listens, cache.live) == (0, False)
        assert cache.lookup([]) == ({}, None)
    finally:
        cache.stop()


def test_a_login_keeps_the_tokens_cached(token: tuple[Any, str]) -> None:
    """An admin login writes the user's last_login, which no token depends on."""
    user, _ = token
    login = ("UPDATE auth_user SET last_login = now() WHERE id = %s", [user.pk])
    assert _notifications("default", "api_tokens", login) == 0
    renamed = ("UPDATE auth_user SET first_name = 'Changed' WHERE id = %s", [user.pk])
    assert _notifications("default", "api_tokens", renamed) == 1
