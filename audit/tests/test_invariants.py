"""The audit names what breaks an invariant (the chaos run, tests/test_chaos.py, shows it
clean on a real run). Other tests' committed orders may share these databases, so each
test looks only at the violations that name its own records."""

import io
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction

from audit.invariants import audit
from orders.models import Order
from orders.saga import PLACE_ORDER
from saga.models import SagaStatus
from saga.publish import saga_start

pytestmark = pytest.mark.django_db(databases=["default", "orders", "inventory", "payments", "notifications"])


def order_create(*, status: str) -> Order:
    return Order.objects.using("orders").create(
        user_id=1,
        email="audit@example.com",
        payment_token="tok_visa",
        status=status,
        total=Decimal("10.00"),
        currency="EUR",
    )


def about(order_or_saga_id: uuid.UUID, violations: list[str]) -> list[str]:
    return [v for v in violations if str(order_or_saga_id) in v]


def test_an_order_without_a_saga_and_a_confirmation_without_money_are_named() -> None:
    orphan = order_create(status=Order.Status.PENDING)
    confirmed = order_create(status=Order.Status.CONFIRMED)
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=confirmed.id, context={"items": []})
    saga.status = SagaStatus.COMPLETED
    saga.save(update_fields=["status"])

    violations = audit()

    assert about(orphan.id, violations) == [f"order {orphan.id}: has no saga"]
    assert about(confirmed.id, violations) == [
        f"order {confirmed.id}: confirmed but the provider has no charge for it",
        f"order {confirmed.id}: confirmed without a payment",
        f"order {confirmed.id}: 0 order_confirmed email sent, not 1",
    ]


def test_the_command_exits_non_zero_and_prints_each_violation() -> None:
    orphan = order_create(status=Order.Status.PENDING)
    out = io.StringIO()

    with pytest.raises(CommandError, match=r"violation\(s\)"):
        call_command("saga_audit", "--grace", "0", stdout=out)

    assert f"VIOLATION order {orphan.id}: has no saga\n" in out.getvalue()


def test_the_deliveries_are_read_from_files_of_several_messages_and_lines_without_a_reference(tmp_path) -> None:
    import json

    from django.core.mail import EmailMessage
    from django.core.mail.backends.filebased import EmailBackend

    from audit.deliveries import read_deliveries

    (tmp_path / "mail" / "a-folder").mkdir(parents=True)
    # One connection, several messages: one file (as two connections with one id() share one).
    with EmailBackend(file_path=str(tmp_path / "mail")) as backend:
        backend.send_messages(
            [
                EmailMessage("s", "b", "o@example.com", ["a@example.com"], headers={"Message-ID": "<saga-1.k@x>"}),
                EmailMessage("s", "b", "o@example.com", ["b@example.com"]),  # Django's own random Message-ID
            ]
        )
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "sms.log").write_text(
        json.dumps({"at": "2026-12-08T00:00:00+00:00", "to": "+15550100", "body": "b"}) + "\n\n"
    )

    delivered = read_deliveries(tmp_path / "mail", tmp_path / "sms")

    assert [(d.channel, d.to) for d in delivered] == [
        ("sms", "+15550100"),
        ("email", "a@example.com"),
        ("email", "b@example.com"),
    ]
    assert [(d.saga_id, d.kind) for d in delivered[:2]] == [("", ""), ("saga-1", "k")]
    # Neither a saga's: each is named as a message no notification explains.
    violations = audit(deliveries=delivered)
    assert len([v for v in violations if "is no saga's" in v]) == 3


def test_the_command_checks_the_delivered_files_when_asked_and_only_where_there_are_files(tmp_path, settings) -> None:
    from notifications import channels

    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    with pytest.raises(CommandError, match=r"--deliveries reads the files .* but EMAIL_BACKEND is .*smtp"):
        call_command("saga_audit", "--deliveries", stdout=io.StringIO())

    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    settings.EMAIL_FILE_PATH, settings.SMS_FILE_PATH = str(tmp_path / "mail"), str(tmp_path / "sms")
    stray = uuid.uuid4()
    channels.send_email(to="a@example.com", subject="s", body="b", reference=f"{stray}.order_confirmed")
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"violation\(s\)"):
        call_command("saga_audit", "--deliveries", stdout=out)
    assert f"whose reference '{stray}.order_confirmed' is no saga's" in out.getvalue()


def test_a_confirmed_orders_stock_is_sold_once_settled_and_no_other_orders_ever() -> None:
    from django.utils import timezone

    from inventory.models import Product, Reservation

    sku = f"AUDIT-{uuid.uuid4().hex[:8]}"
    Product.objects.create(sku=sku, name="audit", price=Decimal("10.00"), on_hand=7, reserved=1)
    confirmed, failed = order_create(status=Order.Status.CONFIRMED), order_create(status=Order.Status.FAILED)
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=confirmed.id, context={"items": []})
    long_ago = timezone.now() - timedelta(hours=1)
    saga.status, saga.pivot_committed_at = SagaStatus.COMPLETED, long_ago
    saga.save(update_fields=["status", "pivot_committed_at"])

    def reserve(order: Order, status: str, quantity: int) -> None:
        Reservation.objects.create(
            saga_id=uuid.uuid4(), order_id=order.id, sku=sku, quantity=quantity, unit_price="10.00", status=status
        )

    reserve(confirmed, Reservation.Status.HELD, 1)
    reserve(failed, Reservation.Status.SOLD, 2)

    violations = audit(initial_stock={sku: 10})

    # (Its steps were never run: the steps' own checks name them too.)
    assert f"saga {saga.id}: confirmed at {long_ago} but its sale is not settled" in violations
    assert f"order {failed.id}: is failed but its {sku} was sold" in violations
    assert f"product {sku}: on_hand=7 plus 2 sold is not the 10 it started with" in violations
    # Settled, the confirmed order's reservation must be sold: it still holds.
    saga.settled_at = timezone.now()
    saga.save(update_fields=["settled_at"])
    violations = audit(initial_stock={sku: 10})
    assert not [v for v in about(saga.id, violations) if "settled" in v]
    assert f"order {confirmed.id}: is confirmed and settled but its {sku} is held, not sold" in violations


def saga_of(order: Order, status: str) -> object:
    with transaction.atomic(using="orders"):
        saga = saga_start(definition=PLACE_ORDER, order_id=order.id, context={"items": []})
    saga.status = status
    saga.save(update_fields=["status"])
    return saga


def ledger(
    saga: object, kind: str, amount: str, *, reference: str = "", charge_reference: str = "", currency: str = "EUR"
) -> str:
    from payments.models import FakeProviderOperation

    reference = reference or f"{kind}-{uuid.uuid4().hex[:12]}"
    step = "charge_payment" if kind == "charge" else "refund_payment"
    FakeProviderOperation.objects.create(
        idempotency_key=f"{saga.id}:{step}:{uuid.uuid4().hex[:6]}",
        kind=kind,
        amount=Decimal(amount),
        currency=currency,
        outcome="succeeded",
        reference=reference,
        charge_reference=charge_reference,
    )
    return reference


def test_money_is_read_from_the_providers_ledger_charge_by_charge() -> None:
    # A failed order the provider charged, with no payment row of ours and no refund.
    kept = order_create(status=Order.Status.FAILED)
    ledger(saga_of(kept, SagaStatus.COMPENSATED), "charge", "10.00")
    # A confirmed order charged another amount than it was quoted.
    overcharged = order_create(status=Order.Status.CONFIRMED)
    ledger(saga_of(overcharged, SagaStatus.COMPLETED), "charge", "12.00")
    # A cancelled order "refunded" by a refund of some other charge, and one refunded in part.
    misrefunded, partly = order_create(status=Order.Status.CANCELLED), order_create(status=Order.Status.FAILED)
    misrefunded_saga = saga_of(misrefunded, SagaStatus.COMPENSATED)
    ledger(misrefunded_saga, "charge", "10.00")
    ledger(misrefunded_saga, "refund", "10.00", charge_reference="charge-of-someone-else")
    partly_saga = saga_of(partly, SagaStatus.COMPENSATED)
    charge = ledger(partly_saga, "charge", "10.00")
    ledger(partly_saga, "refund", "4.00", charge_reference=charge)

    violations = audit()

    assert f"order {kept.id}: failed but the provider kept 10.00 of its money" in violations
    assert f"order {overcharged.id}: confirmed at 10.00 EUR but charged 12.00 EUR" in violations
    assert f"order {misrefunded.id}: cancelled but the provider kept 10.00 of its money" in violations
    assert "the provider refunded 'charge-of-someone-else', which is no charge of a saga" in violations
    assert f"order {partly.id}: failed but the provider kept 6.00 of its money" in violations


def test_a_charge_agrees_with_its_order_in_currency_and_with_our_payment_row() -> None:
    from orders.models import OrderLine
    from payments.models import Payment

    dollars = order_create(status=Order.Status.CONFIRMED)
    ledger(saga_of(dollars, SagaStatus.COMPLETED), "charge", "10.00", currency="USD")
    refunded_in_yen = order_create(status=Order.Status.FAILED)
    yen_saga = saga_of(refunded_in_yen, SagaStatus.COMPENSATED)
    ledger(yen_saga, "refund", "10.00", currency="JPY", charge_reference=ledger(yen_saga, "charge", "10.00"))
    misrecorded = order_create(status=Order.Status.CONFIRMED)
    misrecorded_saga = saga_of(misrecorded, SagaStatus.COMPLETED)
    reference = ledger(misrecorded_saga, "charge", "10.00")
    Payment.objects.create(
        saga_id=misrecorded_saga.id,
        order_id=misrecorded.id,
        amount=Decimal("9.00"),
        currency="EUR",
        status=Payment.Status.CAPTURED,
        provider_charge_id=reference,
    )
    # Lines that add up to 12.00 under a total of 10.00: the quote was not what was charged.
    OrderLine.objects.create(order=misrecorded, sku="A", name="A", quantity=3, unit_price=Decimal("4.00"))

    violations = audit()

    assert f"order {dollars.id}: confirmed at 10.00 EUR but charged 10.00 USD" in violations
    assert f"order {refunded_in_yen.id}: its charge in EUR was refunded in another currency" in violations
    assert (
        f"order {misrecorded.id}: its payment says 9.00 EUR charged as {reference!r}, the provider 10.00 EUR as "
        f"{reference!r}" in violations
    )
    assert f"order {misrecorded.id}: its total is 10.00, its lines add up to 12.00" in violations


def test_a_notification_counts_once_sent_and_on_every_channel_the_customer_gave() -> None:
    from notifications.models import Notification

    order = order_create(status=Order.Status.FAILED)
    order.phone = "+15550100"
    order.save(update_fields=["phone"])
    saga = saga_of(order, SagaStatus.COMPENSATED)
    Notification.objects.create(
        saga_id=saga.id,
        order_id=order.id,
        kind=Notification.Kind.ORDER_FAILED,
        channel=Notification.Channel.EMAIL,
        recipient=order.email,
        status=Notification.Status.SENDING,  # claimed, never delivered
    )

    violations = about(order.id, audit())

    assert f"order {order.id}: 0 order_failed email sent, not 1" in violations
    assert f"order {order.id}: 0 order_failed sms sent, not 1" in violations


def test_what_the_customers_were_sent_is_read_from_the_delivered_files(tmp_path, settings) -> None:
    from audit.deliveries import read_deliveries
    from notifications import channels

    settings.EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
    settings.EMAIL_FILE_PATH, settings.SMS_FILE_PATH = str(tmp_path / "mail"), str(tmp_path / "sms")
    told = order_create(status=Order.Status.FAILED)
    told.phone = "+15550101"
    told.save(update_fields=["phone"])
    told_saga = saga_of(told, SagaStatus.COMPENSATED)
    twice = order_create(status=Order.Status.CONFIRMED)
    twice_saga = saga_of(twice, SagaStatus.COMPLETED)
    wrong = order_create(status=Order.Status.CONFIRMED)
    wrong_saga = saga_of(wrong, SagaStatus.COMPLETED)
    untold = order_create(status=Order.Status.CANCELLED)
    saga_of(untold, SagaStatus.COMPENSATED)

    def email(saga: object, kind: str, to: str = "audit@example.com") -> None:
        saga_id = getattr(saga, "id", saga)
        channels.send_email(to=to, subject="Your order", body="...", reference=f"{saga_id}.{kind}")

    email(told_saga, "order_failed")
    channels.send_sms(to="+15550101", body="...", reference=f"{told_saga.id}.order_failed")
    email(twice_saga, "order_confirmed")
    email(twice_saga, "order_confirmed")  # the same message again
    email(wrong_saga, "order_failed")  # a confirmed order told it failed, too
    email(wrong_saga, "order_confirmed", to="someone-else@example.com")
    email(uuid.uuid4(), "order_confirmed")  # no saga's at all
    delivered = read_deliveries(tmp_path / "mail", tmp_path / "sms")
    assert [(d.channel, d.kind) for d in delivered if d.saga_id == str(told_saga.id)] == [
        ("email", "order_failed"),
        ("sms", "order_failed"),
    ]

    # What check 9 adds to the others (these orders have no payments or Notification rows).
    without = set(audit())
    violations = [v for v in audit(deliveries=delivered) if v not in without]

    assert about(told.id, violations) == []
    [again] = about(twice.id, violations)
    assert again.startswith(f"order {twice.id}: its order_confirmed email was delivered again ")
    assert about(wrong.id, violations) == [
        f"order {wrong.id}: confirmed, but was sent order_failed by email",
        f"order {wrong.id}: its order_confirmed email went to another address",
    ]
    assert about(untold.id, violations) == [f"order {untold.id}: cancelled, and no order_cancelled email was delivered"]
    assert len([v for v in violations if "is no saga's" in v]) == 1
    # A re-send the caller can explain (the chaos run: its sender was killed in between).
    excused = audit(deliveries=delivered, resend_excused=lambda first, again: True)
    assert [v for v in about(twice.id, excused) if v not in without] == []


def test_a_finished_sagas_steps_are_settled_and_its_reservations_are_its_order_lines() -> None:
    from inventory.models import Reservation
    from orders.models import OrderLine
    from saga.models import SagaStep, StepPhase, StepStatus

    order = order_create(status=Order.Status.FAILED)
    saga = saga_of(order, SagaStatus.COMPENSATED)
    SagaStep.objects.create(
        saga=saga, phase=StepPhase.COMPENSATION, position=0, name="refund_payment", status=StepStatus.FAILED
    )
    SagaStep.objects.create(
        saga=saga, phase=StepPhase.COMPENSATION, position=1, name="release_inventory", status=StepStatus.RUNNING
    )
    OrderLine.objects.create(order=order, sku="AUDIT-LINE", name="x", quantity=2, unit_price=Decimal("5.00"))
    Reservation.objects.create(
        saga_id=saga.id, order_id=order.id, sku="AUDIT-LINE", quantity=3, unit_price="5.00", status="released"
    )

    violations = audit()

    assert f"saga {saga.id}: compensated, but its refund_payment is failed" in violations
    assert f"saga {saga.id}: compensated, but its release_inventory is running" in violations
    assert f"order {order.id}: reserved 3 AUDIT-LINE, but ordered 2" in violations
