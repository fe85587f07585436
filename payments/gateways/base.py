"""The interface every payment provider adapter implements.

Both calls take an idempotency key (the saga step key): a provider that sees the same
key twice returns the first outcome and moves no money again (Stripe's semantics).
"""

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from common.exceptions import TransientError


class CardDeclined(Exception):
    """The provider refused the charge: a business outcome, never retried."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


class GatewayUnavailable(TransientError):
    """The provider could not be reached or answered 5xx: retry with backoff."""


@dataclass(frozen=True)
class ChargeResult:
    charge_id: str


@dataclass(frozen=True)
class RefundResult:
    refund_id: str


class PaymentGateway(Protocol):
    def charge(self, *, amount: Decimal, currency: str, token: str, idempotency_key: str) -> ChargeResult: ...

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> RefundResult: ...

    def find_charge(self, *, idempotency_key: str) -> ChargeResult | None:
        """The successful charge made with this idempotency key, if the provider has one."""
        ...
