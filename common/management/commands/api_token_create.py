"""Issue an API token for a user and print its key (the database keeps only its digest)."""

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from common.tokens import api_token_create, api_token_revoke

MAX_TTL = 10 * 365 * 24 * 3600  # ten years: past that, a date overflows or means "never"


class Command(BaseCommand):
    help = "Issue a new API token for USERNAME and print its key (shown only this once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--ttl", type=int, help="seconds until it expires (default: API_TOKEN_TTL)")
        parser.add_argument("--replace", action="store_true", help="revoke the user's other tokens first")

    def handle(self, *args: Any, username: str, ttl: int | None, replace: bool, **options: Any) -> None:
        # Everything is checked before anything changes: a --replace that then failed left
        # the user with no token at all.
        if ttl is not None and not 0 < ttl <= MAX_TTL:
            raise CommandError(f"--ttl {ttl} is not a number of seconds from 1 to {MAX_TTL} (ten years)")
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist as missing:
            raise CommandError(f"no user {username!r}") from missing
        if not user.is_active:
            raise CommandError(f"user {username!r} is inactive: the API refuses every token of theirs")
        if replace:
            api_token_revoke(user=user)
        _, key = api_token_create(user=user, ttl=timedelta(seconds=ttl) if ttl is not None else None)
        self.stdout.write(key)
