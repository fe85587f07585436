"""API tokens at rest (docs/SECURITY.md): the database holds nothing that logs in, and a
token can be revoked and expires. Through the HTTP API, as a client uses it."""

import uuid
from typing import Any

import pytest
import requests
from django.contrib.auth import get_user_model
from django.db import connections

from devstack.topology import Topology, wait_for

from .api import Api

pytestmark = pytest.mark.integration


def _new_user() -> tuple[object, str]:
    password = uuid.uuid4().hex
    user = get_user_model().objects.create_user(username=f"user-{uuid.uuid4().hex[:12]}", password=password)
    return user, password


def _obtain(topology: Topology, username: str, password: str) -> requests.Response:
    return requests.post(
        f"{topology.base_url}/api/auth/token/", json={"username": username, "password": password}, timeout=30
    )


def _stored_values(user_id: int) -> list[str]:
    """Every text value the default database keeps in the user's rows of any token table."""
    values = []
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c "
            "WHERE c.table_schema = 'public' AND c.table_name LIKE '%%token%%' "
            "AND c.data_type IN ('character varying', 'text') "
            "AND EXISTS (SELECT 1 FROM information_schema.columns u WHERE u.table_name = c.table_name "
            "AND u.column_name = 'user_id')"
        )
        for table, column in cursor.fetchall():
            cursor.execute(f'SELECT "{column}" FROM "{table}" WHERE user_id = %s', [user_id])
            values += [row[0] for row in cursor.fetchall()]
    return values


def test_a_token_read_from_the_database_does_not_log_in(topology: Topology) -> None:
    user, password = _new_user()
    issued = _obtain(topology, user.username, password)
    assert issued.status_code == 200, issued.text
    key = issued.json()["token"]
    assert Api(topology.base_url, key).get("/api/orders/").status_code == 200

    stored = _stored_values(user.id)
    assert stored, "the token is stored somewhere"
    assert key not in stored
    for value in stored:
        assert Api(topology.base_url, value).get("/api/orders/").status_code == 401


def test_each_request_for_a_token_issues_another_and_revoking_one_leaves_the_others(topology: Topology) -> None:
    user, password = _new_user()
    first, second = (Api(topology.base_url, _obtain(topology, user.username, password).json()["token"]) for _ in "12")
    assert first.token != second.token

    assert first.post("/api/auth/token/revoke/").status_code == 204

    # Every web process hears of it when it commits (common.notified_cache): within milliseconds.
    wait_for(lambda: first.get("/api/orders/").status_code == 401, timeout=5, what="the revoked token refused")
    assert second.get("/api/orders/").status_code == 200


def test_an_expired_token_is_refused(api: Api) -> None:
    assert api.get("/api/orders/").status_code == 200
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "UPDATE common_apitoken SET expires_at = now() - interval '1 second' WHERE user_id = %s", [api.user_id]
        )

    # (A Response of a 401 is falsy: wait_for is given it in a tuple.)
    (refused,) = wait_for(lambda: (r := api.get("/api/orders/")).status_code == 401 and (r,), timeout=5, what="refused")
    assert refused.status_code == 401
    assert refused.json() == {"detail": "Invalid token."}


def test_a_token_tells_when_it_expires(topology: Topology) -> None:
    from django.conf import settings
    from django.utils.dateparse import parse_datetime
    from django.utils.timezone import now

    user, password = _new_user()
    expires_at = parse_datetime(_obtain(topology, user.username, password).json()["expires_at"])
    left = (expires_at - now()).total_seconds()
    assert settings.API_TOKEN_TTL - 60 < left <= settings.API_TOKEN_TTL


def test_authenticating_a_request_is_one_indexed_lookup(db_access: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hot path (every API call, the benchmark's order POSTs): the token and its user in
    one prepared statement, by the digest's unique index."""
    from django.db import transaction
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIRequestFactory

    from common.sql import PreparedCursor
    from common.tokens import ApiTokenAuthentication, api_token_create

    user, _ = _new_user()
    _, key = api_token_create(user=user)
    request = APIRequestFactory().get("/api/orders/", HTTP_AUTHORIZATION=f"Token {key}")
    prepared: list[tuple[str, Any]] = []
    execute = PreparedCursor.execute

    def recorded(cursor: PreparedCursor, sql: str, params: Any = ()) -> None:
        prepared.append((sql, params))
        execute(cursor, sql, params)

    monkeypatch.setattr(PreparedCursor, "execute", recorded)

    with CaptureQueriesContext(connections["default"]) as queries:
        authenticated_user, _ = ApiTokenAuthentication().authenticate(request)

    assert authenticated_user.pk == user.pk
    assert [q["sql"] for q in queries] == []  # nothing through the ORM's cursors
    assert len(prepared) == 1, prepared
    # The table is tiny here, so let the planner show the index it would use on a big one.
    with transaction.atomic(using="default"), connections["default"].cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {prepared[0][0]}", prepared[0][1])
        plan = " ".join(row[0] for row in cursor.fetchall())
    assert "Index Scan using common_apitoken_digest" in plan, plan


def test_a_changed_password_revokes_the_users_tokens_and_a_re_hash_does_not(topology: Topology) -> None:
    user, password = _new_user()
    taken = _obtain(topology, user.username, password).json()["token"]
    me = Api(topology.base_url, taken)
    assert me.get("/api/orders/").status_code == 200

    # Django re-hashes a password on login when its hasher changed: not a change.
    user.set_password(password)
    user._password = None  # as check_password's setter leaves it
    user.save(update_fields=["password"])
    assert me.get("/api/orders/").status_code == 200

    user.set_password(uuid.uuid4().hex)  # the admin, `changepassword`, the user's own form
    user.save()
    wait_for(lambda: me.get("/api/orders/").status_code == 401, timeout=10, what="the old token refused")
