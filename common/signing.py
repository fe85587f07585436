"""Saga messages are signed: a participant acts only for a saga this system started.

The coordinator signs the saga's identity and the order request (the fields below) with
an HMAC of SECRET_KEY (Django's signing, its own salt; SECRET_KEY_FALLBACKS still verify
during a key rotation) whenever it publishes a chain, and every participant verifies the
signature before it acts (common.steps). So a message that did not come from the
coordinator, for an unknown saga or with an altered order (other items, another card,
another customer), is rejected as `InvalidMessage` and changes nothing.

Fields that steps add along the way (the amount, ids, the outcome) are not covered: they
are checked for type and range by each task. Full protection against someone who can
both read and write the broker is Celery's message signing (celery.security).
"""

import json
from collections.abc import Mapping
from typing import Any

from django.core import signing

from .exceptions import InvalidMessage

SIGNED_FIELDS = ("saga_id", "order_id", "email", "phone", "items", "payment_token", "currency", "total")
SIGNATURE_FIELD = "saga_signature"
_SALT = "saga.context"


def _signer() -> signing.Signer:
    return signing.Signer(salt=_SALT, algorithm="sha256")


def _payload(ctx: Mapping[str, Any]) -> str:
    return json.dumps([ctx.get(name) for name in SIGNED_FIELDS], sort_keys=True, separators=(",", ":"))


def context_sign(ctx: Mapping[str, Any]) -> dict[str, Any]:
    """`ctx` with the signature of its saga identity and order request."""
    signer = _signer()
    signature = signer.sign(_payload(ctx)).rpartition(signer.sep)[2]
    return {**ctx, SIGNATURE_FIELD: signature}


def context_verify(ctx: Mapping[str, Any]) -> None:
    """Raise InvalidMessage unless `ctx` carries a valid signature of its signed fields."""
    signature = ctx.get(SIGNATURE_FIELD)
    if not isinstance(signature, str) or not signature:
        raise InvalidMessage("unsigned saga message: not published by the saga coordinator")
    signer = _signer()
    try:
        signer.unsign(f"{_payload(ctx)}{signer.sep}{signature}")
    except (signing.BadSignature, TypeError, ValueError):
        raise InvalidMessage(
            f"bad signature for saga {str(ctx.get('saga_id'))[:64]!r}: an unknown saga, or an altered message"
        ) from None
