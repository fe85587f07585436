"""Copies of the charge and the refund racing each other around the provider call.

Each test forces one interleaving instead of hoping a worker produces it: the copies are
threads calling the payments services against the real payments database, and the
provider (the fake gateway, its ledger in that database) holds a call open until the test
lets it go. These are the races issue 11 found: a copy that fails fast (circuit open)
ending another copy's attempt, a timed-out call treated as over, and a refund declaring
"nothing charged" while the provider was still completing the charge.
"""

import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pybreaker
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from common.exceptions import StepRefused, TransientError
from common.idempotency import step_key
from common.liveness import process_identity
from payments import resilience, services
from payments.gateways import ChargeVoided, GatewayUnavailable
from payments.gateways.fake import FakeGateway
from payments.models import FakeProviderOperation, Payment, PaymentAttempt

from .api import another_process
from .copies import Copy

pytestmark = pytest.mark.usefixtures("db_access")


class HeldGateway(FakeGateway):
    """The fake provider, but a charge made from a thread named in `hold` waits inside the
    call (after the provider has started on it) until the test releases it; one named in
    `time_out` fails as a call past the task's soft time limit does."""

    def __init__(self) -> None:
        self.hold: set[str] = set()
        self.time_out: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()

    def charge(self, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        if name in self.time_out:
            raise SoftTimeLimitExceeded()
        if name in self.hold:
            self.entered.set()
            assert self.release.wait(30), "the test never released the held charge"
        return super().charge(**kwargs)


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> HeldGateway:
    held = HeldGateway()
    monkeypatch.setattr(services, "get_gateway", lambda: held)
    return held


@pytest.fixture
def breaker(monkeypatch: pytest.MonkeyPatch) -> pybreaker.CircuitBreaker:
    """A circuit of this test's own, so opening it stops no worker elsewhere: one breaker
    per thread over one shared state, as each worker process has its own breaker over the
    state in Redis (a pybreaker breaker holds a lock for the length of a call)."""
    storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    local = threading.local()

    def per_thread() -> pybreaker.CircuitBreaker:
        if not hasattr(local, "breaker"):
            local.breaker = resilience.new_breaker(storage, fail_max=100, reset_timeout=600)
        return local.breaker

    monkeypatch.setattr(resilience, "provider_breaker", per_thread)
    return per_thread()


@pytest.fixture
def saga() -> Iterator[dict[str, Any]]:
    saga_id = uuid.uuid4()
    yield {
        "saga_id": saga_id,
        "order_id": uuid.uuid4(),
        "amount": Decimal("25.00"),
        "currency": "EUR",
        "token": "tok_visa",
    }


def charge_copy(name: str, saga: dict[str, Any]) -> Copy:
    return Copy(name, services.payment_charge, **saga, task_id=f"task-{name}")


def held_at_the_provider(gateway: HeldGateway, saga: dict[str, Any]) -> Copy:
    """Copy A of the charge, started and now inside its call to the provider."""
    gateway.hold.add("A")
    first = charge_copy("A", saga)
    first.start()
    assert gateway.entered.wait(30)
    return first


def ledger(saga_id: uuid.UUID) -> list[tuple[str, str]]:
    """What the provider did under this saga's keys: (kind, outcome), charges first."""
    return sorted(
        FakeProviderOperation.objects.filter(idempotency_key__startswith=str(saga_id)).values_list("kind", "outcome")
    )


def test_a_copy_failing_fast_does_not_end_another_copys_charge(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    first = held_at_the_provider(gateway, saga)

    # A second copy of the same message while the circuit is open: it never reaches the
    # provider, and ends only its own attempt.
    breaker.open()
    with pytest.raises(GatewayUnavailable, match="circuit is open"):
        services.payment_charge(**saga, task_id="task-B")
    breaker.close()

    # The customer cancels: the refund must not settle while copy A is at the provider.
    with pytest.raises(TransientError, match="in flight"):
        services.payment_refund(saga_id=saga["saga_id"])
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.PENDING

    gateway.release.set()
    assert first.outcome()["status"] == Payment.Status.CAPTURED
    refund = services.payment_refund(saga_id=saga["saga_id"])
    assert refund["amount"] == "25.00"
    assert ledger(saga["saga_id"]) == [("charge", "succeeded"), ("refund", "succeeded")]
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.REFUNDED
    outcomes = dict(PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"]).values_list("task_id", "outcome"))
    assert outcomes == {"task-A": "succeeded", "task-B": "not_sent"}


def test_a_timed_out_charge_is_in_flight_until_its_lease_ends_then_the_refund_voids_it(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    gateway.time_out.add("A")
    timed_out = charge_copy("A", saga)
    timed_out.start()
    with pytest.raises(GatewayUnavailable, match="did not answer in time"):
        timed_out.outcome()

    # The provider may still complete a call that timed out: no settling yet.
    with pytest.raises(TransientError, match="in flight"):
        services.payment_refund(saga_id=saga["saga_id"])

    # Past its lease (the hard time limit, after which Celery has killed the call), the
    # refund settles with the provider: it voids the charge's key, for good.
    PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"]).update(lease_until=timezone.now())
    refund = services.payment_refund(saga_id=saga["saga_id"])
    assert refund["refund"] is None and "voided" in refund["reason"]
    assert ledger(saga["saga_id"]) == [("charge", "voided")]
    # A late copy of the charge, and the provider itself, refuse the key from now on.
    with pytest.raises(StepRefused):
        services.payment_charge(**saga, task_id="task-late")
    with pytest.raises(ChargeVoided):
        FakeGateway().charge(
            amount=saga["amount"],
            currency="EUR",
            token="tok_visa",
            idempotency_key=step_key(saga["saga_id"], "charge_payment", "do"),
        )
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.VOIDED


def test_a_timed_out_call_that_opens_the_circuit_is_still_in_flight(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    # One failure short of opening: copy A's timed-out call is the one that opens it.
    for _ in range(breaker.fail_max - 1):
        breaker._state_storage.increment_counter()
    gateway.time_out.add("A")
    timed_out = charge_copy("A", saga)
    timed_out.start()
    with pytest.raises(GatewayUnavailable, match="did not answer in time"):
        timed_out.outcome()
    assert breaker.current_state == "open"

    # That call reached the provider, which may still complete it: its attempt is not
    # "never sent", and the refund waits for its lease instead of voiding at once.
    outcomes = dict(PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"]).values_list("task_id", "outcome"))
    assert outcomes == {"task-A": "unknown"}
    with pytest.raises(TransientError, match="in flight"):
        services.payment_refund(saga_id=saga["saga_id"])
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.PENDING


def test_a_charge_the_provider_completes_while_the_refund_settles_is_refused_uncharged(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    first = held_at_the_provider(gateway, saga)
    # The call outlives its lease (a provider hanging past the time limit): the refund
    # stops waiting and settles with the provider while the call is still open there.
    PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"]).update(lease_until=timezone.now())
    refund = services.payment_refund(saga_id=saga["saga_id"])
    assert refund["refund"] is None

    # The provider now finishes the call, with the circuit open for anything new: the
    # voided key refuses it, so no money moves and nothing is left to refund.
    breaker.open()
    gateway.release.set()
    with pytest.raises(StepRefused, match="voided the charge first"):
        first.outcome()
    assert ledger(saga["saga_id"]) == [("charge", "voided")]
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.VOIDED


@pytest.mark.parametrize("token", ["tok_visa", "tok_chargeDeclined"])
def test_a_later_copy_that_reads_while_the_first_settles_takes_its_outcome_not_a_refusal(
    gateway: HeldGateway,
    breaker: pybreaker.CircuitBreaker,
    saga: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    token: str,
) -> None:
    """Copy A settles the payment (status and key in one statement) without the saga lock;
    copy B, a redelivery, decides under that lock from two reads. A settling between them
    used to read as "settled by its compensation": B failed with StepRefused, and the
    coordinator compensated a paid order (or lost a decline's reason)."""
    saga["token"] = token
    first = held_at_the_provider(gateway, saga)
    real_processed_results = services.processed_results

    def first_settles_between_the_reads(*args: Any, **kwargs: Any) -> Any:
        read = real_processed_results(*args, **kwargs)
        if threading.current_thread().name == "B":
            gateway.release.set()
            first.join(30)
        return read

    monkeypatch.setattr(services, "processed_results", first_settles_between_the_reads)
    later = charge_copy("B", saga)
    later.start()
    if token == "tok_visa":
        assert first.outcome()["status"] == later.outcome()["status"] == Payment.Status.CAPTURED
        assert ledger(saga["saga_id"]) == [("charge", "succeeded")]
    else:
        with pytest.raises(services.PaymentDeclined, match="card_declined"):
            first.outcome()
        with pytest.raises(services.PaymentDeclined, match="card_declined"):
            later.outcome()
    assert Payment.objects.get(saga_id=saga["saga_id"]).status in (Payment.Status.CAPTURED, Payment.Status.DECLINED)


def test_racing_refunds_refund_once(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    assert services.payment_charge(**saga)["status"] == Payment.Status.CAPTURED
    copies = [Copy(f"R{i}", services.payment_refund, saga_id=saga["saga_id"]) for i in range(4)]
    for copy in copies:
        copy.start()
    results = {copy.outcome()["refund"] for copy in copies}
    assert len(results) == 1 and None not in results
    assert ledger(saga["saga_id"]) == [("charge", "succeeded"), ("refund", "succeeded")]
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.REFUNDED


def test_a_refund_does_not_wait_out_the_attempt_of_a_charge_whose_process_died(
    gateway: HeldGateway, breaker: pybreaker.CircuitBreaker, saga: dict[str, Any]
) -> None:
    """A worker SIGKILLed mid-call leaves its attempt in flight until the lease ends (the
    hard time limit + 5 s: 30 s in production). The attempt names its process
    (common.liveness): once that is provably gone, the call is over from our side, as at
    the end of the lease, and the refund settles with the provider at once. An attempt
    of a live process, or of one it cannot see, still holds the refund off."""
    gateway.time_out.add("A")
    timed_out = charge_copy("A", saga)
    timed_out.start()
    with pytest.raises(GatewayUnavailable, match="did not answer in time"):
        timed_out.outcome()
    attempt = PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"])
    assert attempt.get().attempted_by == process_identity()

    for owner in ["another-host/boot/pid:[1]|4242|1000", ""]:  # nothing to see from here
        attempt.update(attempted_by=owner)
        with pytest.raises(TransientError, match="in flight"):
            services.payment_refund(saga_id=saga["saga_id"])
    with another_process() as (process, identity):
        attempt.update(attempted_by=identity)
        with pytest.raises(TransientError, match="in flight"):
            services.payment_refund(saga_id=saga["saga_id"])
        process.kill()
        process.wait()

    refund = services.payment_refund(saga_id=saga["saga_id"])
    assert refund["refund"] is None and "voided" in refund["reason"]
    assert ledger(saga["saga_id"]) == [("charge", "voided")]
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.VOIDED


class VoidBreakingGateway(HeldGateway):
    """A provider adapter that breaks `void_charge`'s contract: it says nothing was charged
    and refuses nothing, so a call still open completes the charge after the void; and
    its first refunds fail."""

    def __init__(self, failing_refunds: int) -> None:
        super().__init__()
        self.failing_refunds = failing_refunds

    def void_charge(self, **kwargs: Any) -> Any:
        return None

    def refund(self, **kwargs: Any) -> Any:
        if self.failing_refunds:
            self.failing_refunds -= 1
            raise services.ProviderError("provider answered 503 to the refund")
        return super().refund(**kwargs)


def test_a_charge_completed_after_its_void_is_refunded_by_the_refund_not_left_to_the_charge(
    breaker: pybreaker.CircuitBreaker, saga: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refund voided the key and left its tombstone; the provider charged the key
    anyway. The charge's copy gives it back, but its refund failed, and from then on
    every copy of the refund returned the tombstone ("nothing was charged") while the
    money stayed charged: only the charge's own retries could refund it."""
    gateway = VoidBreakingGateway(failing_refunds=1)
    monkeypatch.setattr(services, "get_gateway", lambda: gateway)
    first = held_at_the_provider(gateway, saga)
    PaymentAttempt.objects.filter(payment__saga_id=saga["saga_id"]).update(lease_until=timezone.now())
    assert services.payment_refund(saga_id=saga["saga_id"])["refund"] is None  # voided, it says

    gateway.release.set()
    with pytest.raises(GatewayUnavailable, match="503"):
        first.outcome()  # charged after all; its refund failed
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.REFUNDING

    refund = services.payment_refund(saga_id=saga["saga_id"])  # the compensation's next copy
    assert refund["refund"] and refund["amount"] == "25.00"
    assert Payment.objects.get(saga_id=saga["saga_id"]).status == Payment.Status.REFUNDED
    assert ledger(saga["saga_id"]) == [("charge", "succeeded"), ("refund", "succeeded")]
    assert services.payment_refund(saga_id=saga["saga_id"]) == refund  # and every copy after it
