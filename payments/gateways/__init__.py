"""Payment gateway adapters. Pick one with the PAYMENT_GATEWAY setting (a dotted path)."""

from functools import cache

from django.conf import settings
from django.utils.module_loading import import_string

from .base import (
    CardDeclined,
    ChargeResult,
    ChargeVoided,
    GatewayUnavailable,
    PaymentGateway,
    ProviderError,
    RefundResult,
)

__all__ = [
    "CardDeclined",
    "ChargeResult",
    "ChargeVoided",
    "GatewayUnavailable",
    "PaymentGateway",
    "ProviderError",
    "RefundResult",
    "get_gateway",
]


@cache
def get_gateway() -> PaymentGateway:
    return import_string(settings.PAYMENT_GATEWAY)()
