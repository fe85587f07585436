"""API tokens, stored as digests: a token read from the database does not log in."""

import hashlib

from django.conf import settings
from django.db import models


def token_digest(key: str) -> str:
    """SHA-256 of a token's key. The key is 256 random bits, so the digest needs no salt nor
    a slow hash (those protect guessable passwords); it is what we store and look up."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """One API token of a user (a user may hold several: one per client). Revoked by
    deleting the row; unusable after `expires_at`."""

    digest = models.CharField(max_length=64, unique=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"API token of {self.user} (expires {self.expires_at:%Y-%m-%d %H:%M})"
