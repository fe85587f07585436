"""The interface every payment provider adapter implements.

Every call takes an idempotency key (the saga step key): a provider that sees the same
key twice returns the first outcome and moves no money again (Stripe's semantics). A
decline is such an outcome: a charge declined for a key is never captured under that key
(Stripe replays the declined response), so the saga runs no refund after one.
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


class ProviderError(GatewayUnavailable):
    """The provider answered, with an error (e.g. 503): it moved no money. Retry later."""


class ChargeVoided(Exception):
    """The provider refuses the charge's idempotency key: the compensation voided it
    (`void_charge`) before this call reached the provider. Nothing was charged."""


@dataclass(frozen=True)
class ChargeResult:
    charge_id: str


@dataclass(frozen=True)
class RefundResult:
    refund_id: str


class PaymentGateway(Protocol):
    def charge(self, *, amount: Decimal, currency: str, token: str, idempotency_key: str) -> ChargeResult: ...

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> RefundResult: ...

    def void_charge(self, *, idempotency_key: str) -> ChargeResult | None:
        """Settle the charge made with this idempotency key, for good: return it if it
        succeeded; otherwise make sure it never will (a later `charge` with the key raises
        `ChargeVoided`, even one already on its way) and return None.

        What a compensation calls when a charge's outcome is unknown, before it declares
        that nothing was charged: asking alone would race a call the provider is still
        completing. (Stripe: cancel the PaymentIntent created with the key.)
        """
        ...
