"""API tokens (common.models.ApiToken): issue, authenticate, revoke.

The key is shown once, when issued; the database keeps only its digest. Authenticating a
request is one indexed lookup (digest, with the user joined), as DRF's own tokens are.
"""

import functools
import secrets
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import connections, router, transaction
from django.db.models import Field
from django.utils import timezone
from rest_framework import authentication, exceptions

from .db import from_row
from .models import ApiToken, token_digest
from .notified_cache import NotifiedCache
from .sql import prepared

# The rows `_token_with_user` read, by digest, until a token or a user changes or goes
# (common/migrations/0003_api_token_notify.py): revoking a token, or deactivating its
# user, reaches every process's cache when it commits. A minute at most, whatever happens
# to the listener: the bound on a revoke's delay if its connection hangs unnoticed.
TOKENS = NotifiedCache(alias="default", channel="api_tokens", max_age=60.0)


def api_token_create(*, user: AbstractBaseUser, ttl: timedelta | None = None) -> tuple[ApiToken, str]:
    """Issue a new token for `user`; return it and its key (which nothing stores).

    The user's expired tokens are deleted in the same transaction.
    """
    key = secrets.token_urlsafe(32)
    now = timezone.now()
    expires_at = now + (ttl if ttl is not None else timedelta(seconds=settings.API_TOKEN_TTL))
    with transaction.atomic(using="default"):
        # django-stubs type the foreign key as auth.User, AUTH_USER_MODEL's default: any user model is fine.
        ApiToken.objects.filter(user=user, expires_at__lte=now).delete()  # type: ignore[misc]
        token = ApiToken.objects.create(user=user, digest=token_digest(key), expires_at=expires_at)  # type: ignore[misc]
    return token, key


def api_token_revoke(*, token: ApiToken | None = None, user: AbstractBaseUser | None = None) -> int:
    """Delete one token, or every token of `user`; return how many were deleted."""
    tokens = ApiToken.objects.filter(pk=token.pk) if token is not None else ApiToken.objects.filter(user=user)  # type: ignore[misc]
    return tokens.delete()[0]


class ApiTokenAuthentication(authentication.TokenAuthentication):
    """`Authorization: Token <key>`, checked against the stored digests.

    A subclass of DRF's, so the header parsing, the 401 with `WWW-Authenticate: Token`
    and drf-spectacular's security scheme stay DRF's.
    """

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, ApiToken]:
        token = _token_with_user(token_digest(key))
        if token is None or token.expires_at <= timezone.now() or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid token.")
        return token.user, token


def _token_with_user(digest: str) -> ApiToken | None:
    """The token with this digest and its user: what
    `ApiToken.objects.select_related("user").get(digest=...)` reads, from the process's
    token cache (common.notified_cache: no round trip), or else in one prepared statement,
    without building the query or having PostgreSQL plan it on every request (it runs on
    every API call: BENCHMARKS.md). New objects every time: nothing one request caches on
    a user (its permissions) reaches the next.
    """
    alias = router.db_for_read(ApiToken)
    statement, token_fields, user_fields = _token_query(alias)

    def read(digests: list[str]) -> dict[str, Any]:
        with prepared(alias) as cursor:
            cursor.execute(statement, digests)
            row = cursor.fetchone()
        return {} if row is None else {digests[0]: row}

    row = TOKENS.get_many([digest], read).get(digest)
    if row is None:
        return None
    split = len(token_fields)
    token = from_row(ApiToken, token_fields, row[:split], alias)
    token.user = from_row(get_user_model(), user_fields, row[split:], alias)
    return token


@functools.cache
def _token_query(alias: str) -> tuple[str, list[Field], list[Field]]:
    """The statement `_token_with_user` runs on `alias`, and the fields of its columns."""
    user_model = get_user_model()
    token_fields, user_fields = list(ApiToken._meta.concrete_fields), list(user_model._meta.concrete_fields)
    quote = connections[alias].ops.quote_name
    columns = [f"t.{quote(str(f.column))}" for f in token_fields] + [f"u.{quote(str(f.column))}" for f in user_fields]
    statement = (
        f"SELECT {', '.join(columns)} FROM {quote(ApiToken._meta.db_table)} AS t "
        f"JOIN {quote(user_model._meta.db_table)} AS u ON u.{quote(str(user_model._meta.pk.column))} = t.user_id "
        "WHERE t.digest = %s"
    )
    return statement, token_fields, user_fields


class RevokeTokensOnPasswordChange:
    """A password validator that validates nothing: when a user's password changes (the
    admin, `changepassword`, the user's own form), Django tells every validator, and this
    one revokes the user's API tokens, as the change already ends their sessions. A token
    taken with the old password stops working with it (every web process's cache hears of
    the deletion: docs/DECISIONS.md, "Hot rows kept until notified").

    Django's re-hashing of a password on login (a hasher's new iteration count) does not
    count as a change (it saves without telling the validators), so an upgrade revokes
    nothing."""

    def validate(self, password: str, user: AbstractBaseUser | None = None) -> None:
        return None

    def password_changed(self, password: str, user: AbstractBaseUser | None = None) -> None:
        if user is not None and user.pk is not None:
            api_token_revoke(user=user)

    def get_help_text(self) -> str:
        # Shown with the other validators' rules on every password form.
        return "Changing the password revokes the account's API tokens."
