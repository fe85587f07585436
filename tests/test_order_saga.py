"""The order saga end to end, through the HTTP API, on the real topology."""

import concurrent.futures
import uuid

import pytest
from django.utils.dateparse import parse_datetime

from devstack.topology import wait_for
from inventory.models import Reservation
from notifications.models import Notification
from orders.models import Order
from payments.models import FakeProviderOperation, Payment
from saga.models import SagaInstance

from .api import Api, make_product, shelf, steps_by_name, stock, wait_settled

pytestmark = [pytest.mark.integration, pytest.mark.broker]

FORWARD = ["reserve_inventory", "charge_payment", "confirm_order", "notify_customer"]
COMPENSATION = ["refund_payment", "release_inventory", "fail_order", "notify_failure"]


def provider_ops(order: dict) -> list[tuple[str, str]]:
    saga_id = order["saga"]["id"]
    return sorted(
        FakeProviderOperation.objects.filter(idempotency_key__startswith=saga_id).values_list("kind", "outcome")
    )


def test_happy_path_confirms_charges_once_and_notifies_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=10, price="12.50")

    placed = api.place_order([(sku, 3)])
    assert placed["status"] == "pending"
    assert placed["total"] == "37.50"
    assert placed["saga"]["status"] == "running"

    order = api.wait_until_final(placed["id"])

    assert order["status"] == "confirmed"
    assert order["total"] == "37.50"
    assert order["failure_reason"] == ""
    assert order["saga"]["status"] == "completed"
    steps = steps_by_name(order)
    assert list(steps) == FORWARD  # and no compensation step at all
    assert all(s["status"] == "succeeded" and s["attempts"] == 1 and s["last_error"] == "" for s in steps.values())
    assert all(s["started_at"] <= s["finished_at"] for s in steps.values())
    assert stock(sku) == (10, 3)
    [payment] = api.payments(order["id"])
    assert (payment["status"], payment["amount"], payment["refunded_amount"]) == ("captured", "37.50", None)
    assert provider_ops(order) == [("charge", "succeeded")]
    [notification] = api.notifications(order["id"])
    assert (notification["kind"], notification["channel"], notification["status"]) == (
        "order_confirmed",
        "email",
        "sent",
    )


def test_phone_number_adds_an_sms_notification(api: Api, sku: str) -> None:
    make_product(sku, on_hand=1)
    order = api.wait_until_final(api.place_order([(sku, 1)], phone="+14155550123")["id"])
    assert order["status"] == "confirmed"
    assert sorted(n["channel"] for n in api.notifications(order["id"])) == ["email", "sms"]


def test_declined_payment_releases_stock_and_charges_nothing(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)

    order = api.wait_until_final(api.place_order([(sku, 2)], token="tok_chargeDeclined")["id"])

    assert order["status"] == "failed"
    assert "declined" in order["failure_reason"]
    assert order["saga"]["status"] == "compensated"
    assert order["saga"]["failure_step"] == "charge_payment"
    steps = steps_by_name(order)
    assert steps["charge_payment"]["status"] == "failed"
    assert steps["charge_payment"]["last_error"].startswith("PaymentDeclined")
    # Shown with the times of the attempt that failed, as the failing worker reported them.
    reserved, started, failed = (
        parse_datetime(at)
        for at in (
            steps["reserve_inventory"]["finished_at"],
            steps["charge_payment"]["started_at"],
            steps["charge_payment"]["finished_at"],
        )
    )
    assert reserved <= started <= failed, (reserved, started, failed)
    assert [steps[n]["status"] for n in ("confirm_order", "notify_customer")] == ["not_run", "not_run"]
    # The decline is final for the charge's key: no refund runs (Step.final_failures).
    assert [steps[n]["status"] for n in COMPENSATION] == ["not_needed"] + ["succeeded"] * 3
    assert steps["refund_payment"]["attempts"] == 0
    assert stock(sku) == (5, 0)
    [payment] = api.payments(order["id"])
    assert (payment["status"], payment["decline_code"]) == ("declined", "card_declined")
    assert provider_ops(order) == [("charge", "declined")]
    [notification] = api.notifications(order["id"])
    assert notification["kind"] == "order_failed"


def test_a_declined_card_is_logged_as_expected_not_as_an_error(api: Api, sku: str, topology) -> None:
    """A business failure is the task's `throws` (common.steps): one INFO line, no
    traceback; the saga still compensates, from the failure Celery stored."""
    make_product(sku, on_hand=5)
    log = topology.processes["payments"].log_path
    start = log.stat().st_size

    order = api.wait_until_final(api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"])

    assert (order["status"], order["saga"]["status"]) == ("failed", "compensated")
    with log.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    [at] = [i for i, line in enumerate(lines) if order["saga"]["id"] in line and "raised" in line]
    assert " INFO celery.app.trace " in lines[at]
    assert "raised expected: PaymentDeclined('payment declined: card_declined')" in lines[at]
    assert not lines[at + 1 :] or not lines[at + 1].startswith("Traceback")


def test_insufficient_stock_fails_before_any_charge(api: Api, sku: str) -> None:
    make_product(sku, on_hand=2)

    order = api.wait_until_final(api.place_order([(sku, 3)])["id"])

    assert order["status"] == "failed"
    assert "not enough stock" in order["failure_reason"]
    assert order["saga"]["failure_step"] == "reserve_inventory"
    assert steps_by_name(order)["charge_payment"]["status"] == "not_run"
    assert stock(sku) == (2, 0)
    assert api.payments(order["id"]) == []
    assert provider_ops(order) == []
    assert [n["kind"] for n in api.notifications(order["id"])] == ["order_failed"]


def test_multi_line_order_reserves_all_lines_or_none(api: Api, sku: str) -> None:
    plenty, scarce = f"{sku}-A", f"{sku}-B"
    make_product(plenty, on_hand=10)
    make_product(scarce, on_hand=1)

    order = api.wait_until_final(api.place_order([(plenty, 4), (scarce, 2)])["id"])

    assert order["status"] == "failed"
    assert stock(plenty) == (10, 0)
    assert stock(scarce) == (1, 0)
    assert not Reservation.objects.filter(order_id=order["id"]).exists()

    # Both lines held, each at its own catalogue price, and the order charged their sum. (A
    # new product: a price changed in place reaches the web's quotes when its notification
    # does, a few milliseconds later; common.notified_cache.)
    cheap = f"{sku}-C"
    make_product(cheap, on_hand=1, price="2.50")
    order = api.wait_until_final(api.place_order([(cheap, 1), (plenty, 4)])["id"])

    assert order["status"] == "confirmed"
    assert order["total"] == "42.50"
    assert stock(plenty) == (10, 4)
    assert stock(cheap) == (1, 1)
    wait_settled([order["saga"]["id"]])  # then the confirmed order's lines are sold
    held = Reservation.objects.filter(order_id=order["id"]).order_by("sku")
    assert [(r.sku, r.quantity, str(r.unit_price), r.status) for r in held] == [
        (plenty, 4, "10.00", "sold"),
        (cheap, 1, "2.50", "sold"),
    ]
    [payment] = Payment.objects.filter(order_id=order["id"])
    assert (str(payment.amount), payment.status) == ("42.50", "captured")


def test_unknown_sku_is_a_400_and_creates_nothing(api: Api, sku: str) -> None:
    make_product(sku, on_hand=1)
    response = api.post(
        "/api/orders/",
        json={
            "email": "a@example.com",
            "items": [{"sku": sku, "quantity": 1}, {"sku": "NOPE-404", "quantity": 1}],
            "payment_token": "tok_visa",
        },
    )
    assert response.status_code == 400
    # The same shape as a line's own field errors (REST framework's, keyed by index).
    assert response.json() == {"items": {"1": {"sku": ["Unknown SKU 'NOPE-404'."]}}}
    assert not Order.objects.filter(user_id=api.user_id).exists()
    assert stock(sku) == (1, 0)


def test_a_total_larger_than_an_order_may_hold_is_a_400_and_creates_nothing(api: Api, sku: str) -> None:
    make_product(sku, on_hand=2000, price="99999999.99")  # the catalogue's largest price
    response = api.post(
        "/api/orders/",
        json={"email": "a@example.com", "items": [{"sku": sku, "quantity": 1000}], "payment_token": "tok_visa"},
    )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "items": ["These items come to 99999999990.00, more than an order may come to (9999999999.99)."]
    }
    assert not Order.objects.filter(user_id=api.user_id).exists()
    assert stock(sku) == (2000, 0)


def test_cancel_while_the_charge_is_in_flight_refunds_and_releases(api: Api, sku: str) -> None:
    make_product(sku, on_hand=4, price="20.00")
    placed = api.place_order([(sku, 2)], token="tok_slow")
    # The charge is at the (slow) provider: the payment row says so.
    wait_for(
        lambda: Payment.objects.filter(order_id=placed["id"], status="pending").exists(),
        timeout=30,
        what="the charge to be in flight",
    )

    response = api.post(f"/api/orders/{placed['id']}/cancel/")
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    assert response.json()["saga"]["status"] == "compensating"

    order = api.wait_until_final(placed["id"], timeout=120)
    assert order["status"] == "cancelled"
    assert order["saga"]["status"] == "compensated"
    # The timeline says what happened (issue 11): both steps before the pivot ran, with
    # their attempts and times; the confirmation refused (the order was being cancelled, it
    # did not fail); the confirmation email never ran.
    steps = steps_by_name(order)
    for name in ("reserve_inventory", "charge_payment"):
        step = steps[name]
        assert (name, step["status"], step["attempts"]) == (name, "succeeded", 1)
        assert step["started_at"] and step["finished_at"] and step["started_at"] < step["finished_at"]
    assert steps["confirm_order"]["status"] == "refused"
    assert steps["confirm_order"]["last_error"].startswith("StepRefused")
    assert steps["notify_customer"]["status"] == "not_run"
    assert stock(sku) == (4, 0)
    [payment] = api.payments(order["id"])
    assert (payment["status"], payment["refunded_amount"]) == ("refunded", "40.00")
    assert provider_ops(order) == [("charge", "succeeded"), ("refund", "succeeded")]
    assert [n["kind"] for n in api.notifications(order["id"])] == ["order_cancelled"]

    # Cancelling again is the same cancel, not a second one.
    assert api.post(f"/api/orders/{placed['id']}/cancel/").status_code == 202
    assert provider_ops(order) == [("charge", "succeeded"), ("refund", "succeeded")]


def test_a_confirmed_order_cannot_be_cancelled(api: Api, sku: str) -> None:
    make_product(sku, on_hand=1)
    order = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    response = api.post(f"/api/orders/{order['id']}/cancel/")
    assert response.status_code == 409
    assert "confirmed" in response.json()["detail"]
    assert api.order(order["id"])["status"] == "confirmed"
    assert stock(sku) == (1, 1)


def test_idempotency_key_replays_the_same_order_and_refuses_a_different_body(api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    body = {"email": "a@example.com", "items": [{"sku": sku, "quantity": 1}], "payment_token": "tok_visa"}
    key = {"Idempotency-Key": str(uuid.uuid4())}

    first = api.post("/api/orders/", json=body, headers=key)
    replay = api.post("/api/orders/", json=body, headers=key)
    other = api.post("/api/orders/", json={**body, "items": [{"sku": sku, "quantity": 2}]}, headers=key)

    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert Order.objects.filter(user_id=api.user_id).count() == 1
    assert SagaInstance.objects.filter(order_id=first.json()["id"]).count() == 1
    api.wait_until_final(first.json()["id"])
    assert stock(sku) == (5, 1)


def test_concurrent_orders_for_the_last_units_confirm_exactly_that_many(topology, sku: str) -> None:
    make_product(sku, on_hand=3)
    buyers = [Api.for_new_user(topology.base_url) for _ in range(10)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        placed = list(pool.map(lambda buyer: buyer.place_order([(sku, 1)]), buyers))
    finals = [buyer.wait_until_final(order["id"], timeout=120) for buyer, order in zip(buyers, placed, strict=True)]

    statuses = sorted(order["status"] for order in finals)
    assert statuses == ["confirmed"] * 3 + ["failed"] * 7
    assert stock(sku) == (3, 3)
    wait_settled(order["saga"]["id"] for order in finals)
    assert Reservation.objects.filter(sku=sku, status="sold").count() == 3
    assert shelf(sku) == (0, 0, 3)
    order_ids = [order["id"] for order in finals]
    assert Payment.objects.filter(order_id__in=order_ids, status="captured").count() == 3
    assert Notification.objects.filter(order_id__in=order_ids).count() == 10
