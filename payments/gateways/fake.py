"""A deterministic provider for development and tests, driven by Stripe-style tokens.

- tok_visa, tok_mastercard, tok_amex: the charge succeeds.
- tok_chargeDeclined: declined (`card_declined`).
- tok_chargeDeclinedInsufficientFunds: declined (`insufficient_funds`).
- tok_slow: succeeds after FAKE_PROVIDER_SLOW_SECONDS (default 5 s).
- tok_transient: unavailable (503) for the first 2 attempts of a charge, then succeeds.
- tok_unavailable: always unavailable: retries run out and the saga compensates.
- tok_hang: the first attempt hangs for FAKE_PROVIDER_HANG_SECONDS (past the task's time
  limit); the retry succeeds.
- tok_refundUnavailable: the charge succeeds after the slow delay; every refund is unavailable.

Anything else is declined as `invalid_token`. The provider's own ledger (what it
charged and refunded, by idempotency key) lives in the payments database, in
`FakeProviderOperation`, so a replayed key returns the recorded outcome exactly as a
real provider would. `void_charge` records a `voided` outcome under the charge's key
unless a charge is recorded there first: the key's unique constraint decides which of
the two came first, as a real provider's idempotency store would.
"""

import time
import uuid
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connections, transaction

from payments.models import FakeProviderAttempt, FakeProviderOperation

from .base import CardDeclined, ChargeResult, ChargeVoided, ProviderError, RefundResult

DB = "payments"

SUCCEEDING_TOKENS = {"tok_visa", "tok_mastercard", "tok_amex", "tok_transient"}
DECLINING_TOKENS = {
    "tok_chargeDeclined": "card_declined",
    "tok_chargeDeclinedInsufficientFunds": "insufficient_funds",
}
SLOW_TOKENS = {"tok_slow", "tok_refundUnavailable"}
TRANSIENT_TOKEN, TRANSIENT_FAILURES = "tok_transient", 2
UNAVAILABLE_TOKEN = "tok_unavailable"
HANG_TOKEN = "tok_hang"
REFUND_UNAVAILABLE_TOKEN = "tok_refundUnavailable"
VOIDED = "voided"


class FakeGateway:
    def charge(self, *, amount: Decimal, currency: str, token: str, idempotency_key: str) -> ChargeResult:
        previous = self._charge_at_once(amount=amount, currency=currency, token=token, idempotency_key=idempotency_key)
        if previous is None:
            previous = FakeProviderOperation.objects.filter(idempotency_key=idempotency_key).first()
        if previous is None:
            attempt = self._count_attempt(idempotency_key)
            if token == UNAVAILABLE_TOKEN or (token == TRANSIENT_TOKEN and attempt <= TRANSIENT_FAILURES):
                raise ProviderError(f"provider answered 503 (attempt {attempt})")
            if token == HANG_TOKEN and attempt == 1:
                time.sleep(settings.FAKE_PROVIDER_HANG_SECONDS)
            if token in SLOW_TOKENS:
                time.sleep(settings.FAKE_PROVIDER_SLOW_SECONDS)
            outcome = "succeeded" if token in SUCCEEDING_TOKENS | SLOW_TOKENS | {HANG_TOKEN} else "declined"
            code = "" if outcome == "succeeded" else DECLINING_TOKENS.get(token, "invalid_token")
            previous = self._record(
                idempotency_key,
                kind="charge",
                amount=amount,
                currency=currency,
                outcome=outcome,
                code=code,
                reference=f"ch_{uuid.uuid4().hex[:24]}",
                token=token,
            )
        if previous.outcome == VOIDED:
            raise ChargeVoided(f"charge {idempotency_key} was voided before it completed")
        if previous.outcome == "declined":
            raise CardDeclined(previous.code, f"card declined: {previous.code}")
        return ChargeResult(charge_id=previous.reference)

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> RefundResult:
        previous = FakeProviderOperation.objects.filter(idempotency_key=idempotency_key).first()
        if previous is None:
            charge = FakeProviderOperation.objects.filter(kind="charge", reference=charge_id).first()
            if charge is None or charge.outcome != "succeeded":
                raise CardDeclined("charge_not_found", f"no successful charge {charge_id} to refund")
            if charge.token == REFUND_UNAVAILABLE_TOKEN:
                raise ProviderError("provider answered 503 to the refund")
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

    def void_charge(self, *, idempotency_key: str) -> ChargeResult | None:
        settled = self._record(
            idempotency_key,
            kind="charge",
            amount=Decimal("0"),
            currency="",
            outcome=VOIDED,
            code="",
            reference=f"vo_{uuid.uuid4().hex[:24]}",
        )
        return ChargeResult(charge_id=settled.reference) if settled.outcome == "succeeded" else None

    @staticmethod
    def _charge_at_once(
        *, amount: Decimal, currency: str, token: str, idempotency_key: str
    ) -> FakeProviderOperation | None:
        """A charge whose outcome the token decides at once (succeed, decline), as one
        statement: the attempt counted, the outcome recorded under the key, or the
        outcome recorded there before returned. None for the tokens that behave over
        time (slow, hanging, unavailable), and when a racing call's record is not
        visible to this statement yet: the caller's general path reads it."""
        if token in SLOW_TOKENS or token in (TRANSIENT_TOKEN, UNAVAILABLE_TOKEN, HANG_TOKEN):
            return None
        succeeded = token in SUCCEEDING_TOKENS
        fields = {
            "kind": "charge",
            "amount": amount,
            "currency": currency,
            "outcome": "succeeded" if succeeded else "declined",
            "code": "" if succeeded else DECLINING_TOKENS.get(token, "invalid_token"),
            "reference": f"ch_{uuid.uuid4().hex[:24]}",
            "token": token,
            "charge_reference": "",
        }
        operations, attempts = FakeProviderOperation._meta.db_table, FakeProviderAttempt._meta.db_table
        with connections[DB].cursor() as cursor:
            cursor.execute(
                f"WITH prev AS (SELECT * FROM {operations} WHERE idempotency_key = %s), "
                f"counted AS (INSERT INTO {attempts} (idempotency_key, attempts) SELECT %s, 1 "
                "WHERE NOT EXISTS (SELECT 1 FROM prev) "
                f"ON CONFLICT (idempotency_key) DO UPDATE SET attempts = {attempts}.attempts + 1), "
                f"new AS (INSERT INTO {operations} (idempotency_key, {', '.join(fields)}, created_at) "
                f"SELECT %s, {', '.join(['%s'] * len(fields))}, now() WHERE NOT EXISTS (SELECT 1 FROM prev) "
                "ON CONFLICT (idempotency_key) DO NOTHING RETURNING *) "
                "SELECT * FROM new UNION ALL SELECT * FROM prev",
                [idempotency_key, idempotency_key, idempotency_key, *fields.values()],
            )
            row = cursor.fetchone()
            if row is None:
                return None
            columns = [column.name for column in cursor.description]
        return FakeProviderOperation.from_db(DB, columns, row)

    @staticmethod
    def _count_attempt(idempotency_key: str) -> int:
        table = FakeProviderAttempt._meta.db_table
        with connections[DB].cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (idempotency_key, attempts) VALUES (%s, 1) "
                f"ON CONFLICT (idempotency_key) DO UPDATE SET attempts = {table}.attempts + 1 RETURNING attempts",
                [idempotency_key],
            )
            return cursor.fetchone()[0]

    @staticmethod
    def _record(idempotency_key: str, **fields: object) -> FakeProviderOperation:
        try:
            with transaction.atomic(using=DB):
                return FakeProviderOperation.objects.create(idempotency_key=idempotency_key, **fields)
        except IntegrityError:
            # Two deliveries raced to the provider: the first one's outcome stands.
            return FakeProviderOperation.objects.get(idempotency_key=idempotency_key)
