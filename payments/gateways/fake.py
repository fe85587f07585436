"""A deterministic provider for development and tests, driven by Stripe-style tokens.

| token                       | outcome                                                  |
|-----------------------------|----------------------------------------------------------|
| tok_visa, tok_mastercard    | charge succeeds                                          |
| tok_chargeDeclined          | declined (`card_declined`)                               |
| tok_chargeDeclinedInsufficientFunds | declined (`insufficient_funds`)                  |
| tok_slow                    | succeeds after FAKE_PROVIDER_SLOW_SECONDS (default 5 s)  |

Anything else is declined as `invalid_token`. The provider's own ledger (what it
charged and refunded, by idempotency key) lives in the payments database, in
`FakeProviderOperation`, so a replayed key returns the recorded outcome exactly as a
real provider would.
"""

import time
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from payments.models import FakeProviderOperation

from .base import CardDeclined, ChargeResult, RefundResult

DB = "payments"

SUCCEEDING_TOKENS = {"tok_visa", "tok_mastercard", "tok_amex"}
DECLINING_TOKENS = {
    "tok_chargeDeclined": "card_declined",
    "tok_chargeDeclinedInsufficientFunds": "insufficient_funds",
}
SLOW_TOKEN = "tok_slow"


class FakeGateway:
    def charge(self, *, amount: Decimal, currency: str, token: str, idempotency_key: str) -> ChargeResult:
        previous = FakeProviderOperation.objects.filter(idempotency_key=idempotency_key).first()
        if previous is None:
            if token == SLOW_TOKEN:
                time.sleep(settings.FAKE_PROVIDER_SLOW_SECONDS)
            outcome = "succeeded" if token in SUCCEEDING_TOKENS | {SLOW_TOKEN} else "declined"
            code = "" if outcome == "succeeded" else DECLINING_TOKENS.get(token, "invalid_token")
            previous = self._record(
                idempotency_key,
                kind="charge",
                amount=amount,
                currency=currency,
                outcome=outcome,
                code=code,
                reference=f"ch_{uuid.uuid4().hex[:24]}",
            )
        if previous.outcome == "declined":
            raise CardDeclined(previous.code, f"card declined: {previous.code}")
        return ChargeResult(charge_id=previous.reference)

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> RefundResult:
        previous = FakeProviderOperation.objects.filter(idempotency_key=idempotency_key).first()
        if previous is None:
            charge = FakeProviderOperation.objects.filter(kind="charge", reference=charge_id).first()
            if charge is None or charge.outcome != "succeeded":
                raise CardDeclined("charge_not_found", f"no successful charge {charge_id} to refund")
            previous = self._record(
                idempotency_key,
                kind="refund",
                amount=amount,
                currency=charge.currency,
                outcome="succeeded",
                code="",
                reference=f"re_{uuid.uuid4().hex[:24]}",
                charge_reference=charge_id,
            )
        return RefundResult(refund_id=previous.reference)

    @staticmethod
    def _record(idempotency_key: str, **fields: object) -> FakeProviderOperation:
        try:
            with transaction.atomic(using=DB):
                return FakeProviderOperation.objects.create(idempotency_key=idempotency_key, **fields)
        except IntegrityError:
            # Two deliveries raced to the provider: the first one's outcome stands.
            return FakeProviderOperation.objects.get(idempotency_key=idempotency_key)
