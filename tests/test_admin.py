"""The operator's console: find a failed saga, see why, retry or compensate it, watch it finish.

The browser test drives Debian's Chromium (/usr/bin/chromium, installed by `make test`
when missing and possible) through Playwright against the session's web process; the
others post to the admin with Django's test client, in this process, against the same
databases and broker, so the session's workers carry the actions out.
"""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from devstack.topology import Topology, free_port, wait_for
from inventory.admin import ProductForm
from inventory.models import Product
from notifications.models import Notification
from orders.models import Order
from payments.models import Payment
from saga.models import SagaAuditEntry, SagaInstance, SagaStep

from .api import Api, held_saga, make_product, steps_by_name, stock

pytestmark = [
    pytest.mark.integration,
    # WhiteNoise, in this process's admin client: static files are served from the apps.
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHANGELIST = "/admin/saga/sagainstance/"
MAIL_OUTAGE_FINGERPRINT = "TransientError @ notify_customer"


def operator(*codenames: str, password: str = "") -> tuple[object, str]:
    """A staff user who may see sagas and, with `codenames`, act on them."""
    password = password or uuid.uuid4().hex
    user = get_user_model().objects.create_user(
        username=f"operator-{uuid.uuid4().hex[:8]}", password=password, is_staff=True
    )
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="saga", codename__in=["view_sagainstance", *codenames])
    )
    return user, password


def admin_client(*codenames: str) -> tuple[Client, object]:
    user, _ = operator(*codenames)
    client = Client()
    client.force_login(user)
    return client, user


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


def audit(saga_id: str) -> list[tuple[str, str, str]]:
    entries = SagaAuditEntry.objects.filter(saga_id=saga_id).order_by("created_at", "id")
    return [(entry.action, entry.outcome, entry.username) for entry in entries]


@pytest.fixture(scope="module")
def mail_outage_sagas(topology: Topology) -> Iterator[list[dict]]:
    """Three confirmed orders whose confirmation email could not be sent: the mail server
    was down (the notifications worker pointed at a closed SMTP port) until the email
    step ran out of retries, and their sagas need attention. Then the mail server is back."""
    notifications = topology.processes["notifications"]
    outage = {
        **topology.env,
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(free_port()),
        # Give up within a second or two, well before the step's deadline: the sweeper
        # would otherwise re-publish the step while its retries are still running.
        "SAGA_COMPENSATION_MAX_RETRIES": "2",
        "TASK_RETRY_BACKOFF_MAX": "1",
    }
    sku = f"T-{uuid.uuid4().hex[:10].upper()}"
    make_product(sku, on_hand=5)
    api = Api.for_new_user(topology.base_url)
    notifications.stop()
    notifications.start(outage)
    try:
        topology.wait_ready(["notifications"])
        placed = [api.place_order([(sku, 1)]) for _ in range(3)]
        orders = [
            wait_for(
                lambda p=p: (o := api.order(p["id"]))["saga"]["status"] == "needs_attention" and o,
                timeout=90,
                what="the saga to need attention after the email retries ran out",
            )
            for p in placed
        ]
    finally:
        notifications.stop()
        notifications.start(topology.env)
        topology.wait_ready(["notifications"])
    for order in orders:
        assert order["status"] == "confirmed"  # past the pivot: nothing is undone
        assert steps_by_name(order)["notify_customer"]["status"] == "failed"
    yield [{**order, "api": api, "sku": sku} for order in orders]


def test_each_action_needs_its_own_permission(api: Api, sku: str) -> None:
    make_product(sku, on_hand=2)
    order = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    saga_id = order["saga"]["id"]
    viewer, _ = admin_client()
    retrier, _ = admin_client("retry_saga")

    def actions(client: Client) -> set[str]:
        response = client.get(CHANGELIST)
        assert response.status_code == 200
        form = response.context["action_form"]
        return set() if form is None else {name for name, _ in form.fields["action"].choices if name}

    assert actions(viewer) == set()
    assert actions(retrier) == {"retry_sagas", "retry_same_failure"}
    assert viewer.get(f"{CHANGELIST}{saga_id}/retry/").status_code == 403
    assert retrier.get(f"{CHANGELIST}{saga_id}/compensate/").status_code == 403
    page = viewer.get(f"{CHANGELIST}{saga_id}/change/").content.decode()
    assert "saga-retry" not in page and "saga-compensate" not in page
    assert "saga-retry" in retrier.get(f"{CHANGELIST}{saga_id}/change/").content.decode()
    # Posting an action one may not use does nothing (Django rejects the choice).
    viewer.post(CHANGELIST, {"action": "retry_sagas", "_selected_action": [saga_id], "post": "yes"})
    assert audit(saga_id) == []


def test_finished_sagas_are_not_retried_and_the_refusal_is_recorded(api: Api, sku: str) -> None:
    make_product(sku, on_hand=2)
    confirmed = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    declined = api.wait_until_final(api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"])
    client, user = admin_client("retry_saga")
    ids = [confirmed["saga"]["id"], declined["saga"]["id"]]

    confirmation = client.post(CHANGELIST, {"action": "retry_sagas", "_selected_action": ids})
    assert confirmation.status_code == 200
    page = confirmation.content.decode()
    assert "it completed: nothing to retry" in page
    assert "tombstones refuse them" in page
    assert 'value="Yes, retry"' not in page  # nothing to confirm

    response = client.post(CHANGELIST, {"action": "retry_sagas", "_selected_action": ids, "post": "yes"}, follow=True)
    assert any(message.startswith("Not retried 2 sagas") for message in messages_of(response))
    for saga_id in ids:
        assert audit(saga_id) == [("retry", "refused", user.username)]
    saga = SagaInstance.objects.get(id=ids[1])
    assert (saga.status, saga.generation) == ("compensated", 1)  # nothing was re-published


def test_compensate_now_stops_a_running_saga_before_its_pivot_once(api: Api, sku: str) -> None:
    make_product(sku, on_hand=3)
    # Logged in first: the slow charge gives the operator FAKE_PROVIDER_SLOW_SECONDS to act.
    client, user = admin_client("compensate_saga")
    placed = api.place_order([(sku, 2)], token="tok_slow")
    saga_id = placed["saga"]["id"]
    wait_for(
        lambda: Payment.objects.filter(order_id=placed["id"], status="pending").exists(),
        timeout=30,
        what="the charge to be in flight",
    )

    # The store records the forward chain at the pivot (saga.engine): until then it knows
    # the chain is in flight from its first step, not which step it has reached.
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_inventory").status == "running"
    confirmation = client.get(f"{CHANGELIST}{saga_id}/compensate/")
    assert "compensate (its chain is at reserve_inventory or a step after it)" in confirmation.content.decode()
    first = client.post(f"{CHANGELIST}{saga_id}/compensate/", {"post": "yes"}, follow=True)
    second = client.post(f"{CHANGELIST}{saga_id}/compensate/", {"post": "yes"}, follow=True)  # a double click

    assert any(m.startswith("Compensated 1 saga") for m in messages_of(first)), messages_of(first)
    assert any("it is already compensating" in m for m in messages_of(second)), messages_of(second)
    order = api.wait_until_final(placed["id"], timeout=60)
    assert (order["status"], order["saga"]["status"]) == ("failed", "compensated")
    saga = SagaInstance.objects.get(id=saga_id)
    assert (saga.failure_type, saga.failure_step) == ("CompensatedByOperator", "reserve_inventory")
    assert [p["status"] for p in api.payments(placed["id"])] == ["refunded"]  # the slow charge went through
    assert stock(sku) == (3, 0)
    assert [(n["kind"], n["channel"]) for n in api.notifications(placed["id"])] == [("order_failed", "email")]
    assert audit(saga_id) == [("compensate", "done", user.username), ("compensate", "refused", user.username)]
    page = client.get(f"{CHANGELIST}{saga_id}/change/").content.decode()
    assert "it is already compensating" in page  # the audit inline


def test_the_timeline_of_a_running_saga_shows_the_step_its_chain_is_on(api: Api, sku: str) -> None:
    make_product(sku, on_hand=3)
    placed = api.place_order([(sku, 1)], token="tok_hang")  # the provider hangs: the charge stays active
    saga_id = placed["saga"]["id"]
    wait_for(
        lambda: Payment.objects.filter(order_id=placed["id"], status="pending").exists(),
        timeout=30,
        what="the charge to be at the provider",
    )
    client, _ = admin_client()

    # The store still has the chain at its first step (it records the chain at the pivot);
    # the page asks the workers, who say where it is (issue 11).
    page = client.get(f"{CHANGELIST}{saga_id}/change/").content.decode()

    assert "Running on payments@" in page
    assert "Passed (the chain is further on)" in page
    assert "charge_payment: running on payments@" in page  # the page's "current step" too
    assert SagaStep.objects.get(saga_id=saga_id, name="reserve_inventory").status == "running"
    assert api.wait_until_final(placed["id"], timeout=90)["status"] == "confirmed"


def test_compensate_refuses_once_the_order_is_confirmed_even_if_the_saga_store_lags() -> None:
    # The order's row is the pivot guard's truth: a store that says "running at
    # charge_payment", no pivot recorded, for an order already confirmed (the state a store
    # behind its order would show) is not compensated. Built by hand, nothing published: a
    # finished saga can no longer be turned back to running (saga migration 0013).
    saga = held_saga("charge_payment", context={"items": []}, status=Order.Status.CONFIRMED)
    client, user = admin_client("compensate_saga", "view_sagainstance")
    try:
        response = client.post(f"{CHANGELIST}{saga.id}/compensate/", {"post": "yes"}, follow=True)
    finally:
        # Finished, so that no sweep takes it up and later tests find no saga running.
        SagaStep.objects.filter(saga_id=saga.id, name="charge_payment").update(status="succeeded")
        SagaInstance.objects.filter(id=saga.id).update(status="completed", current_step="")
    assert any("its order is confirmed" in m for m in messages_of(response)), messages_of(response)
    assert audit(str(saga.id)) == [("compensate", "refused", user.username)]
    assert Order.objects.get(id=saga.order_id).status == Order.Status.CONFIRMED
    assert not SagaStep.objects.filter(saga_id=saga.id, phase="compensation").exclude(status="pending").exists()


def test_an_operator_retries_a_saga_that_needs_attention_in_the_browser(
    mail_outage_sagas: list[dict], topology: Topology
) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no {CHROMIUM}: `make test` installs Debian's chromium when it runs as root with apt")
    order = mail_outage_sagas[0]
    saga_id, api = order["saga"]["id"], order["api"]
    user, password = operator("retry_saga")
    screenshots = Path(os.environ.get("TEST_LOG_DIR", topology.log_dir))

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.set_default_timeout(15_000)
            page.goto(f"{topology.base_url}/admin/login/?next={CHANGELIST}")
            page.fill("#id_username", user.username)
            page.fill("#id_password", password)
            page.click("input[type=submit]")

            # Filter to the sagas that need attention, then find this order's.
            page.click("#changelist-filter a:text-is('Needs Attention')")
            page.wait_for_url("**status__exact=needs_attention**")
            page.fill("#searchbar", order["id"])
            page.press("#searchbar", "Enter")
            rows = page.locator("#result_list tbody tr")
            sync_api.expect(rows).to_have_count(1)
            sync_api.expect(rows.first).to_contain_text(MAIL_OUTAGE_FINGERPRINT)
            page.screenshot(path=str(screenshots / "admin-sagas-needing-attention.png"), full_page=True)
            rows.first.locator("th a").click()

            # The timeline says why: the email step failed after its retries.
            timeline = page.locator(".inline-group").first
            notify = timeline.locator("tr", has_text="notify_customer")
            sync_api.expect(notify).to_contain_text("Failed")
            sync_api.expect(notify).to_contain_text("TransientError")
            sync_api.expect(page.locator(".field-fingerprint")).to_contain_text(MAIL_OUTAGE_FINGERPRINT)
            sync_api.expect(page.locator(".field-order_link a")).to_have_text(order["id"])
            page.screenshot(path=str(screenshots / "admin-saga-needs-attention.png"), full_page=True)

            page.click("a.saga-retry")
            sync_api.expect(page.locator("#saga-plan")).to_contain_text("resumed from notify_customer")
            page.screenshot(path=str(screenshots / "admin-saga-retry-confirmation.png"), full_page=True)
            page.click("input[value='Yes, retry']")
            sync_api.expect(page.locator(".messagelist")).to_contain_text("Retried 1 saga")

            def completed() -> bool:
                page.reload()
                return page.locator(".field-status .readonly").inner_text().strip().lower() == "completed"

            wait_for(completed, timeout=30, what="the saga page to say completed", interval=0.5)
            sync_api.expect(page.locator(".inline-group").nth(1)).to_contain_text(user.username)
            page.screenshot(path=str(screenshots / "admin-saga-retried.png"), full_page=True)

            # Retrying it again has nothing to do, and says so.
            page.click("a.saga-retry")
            sync_api.expect(page.locator("#saga-plan")).to_contain_text("it completed: nothing to retry")
            sync_api.expect(page.locator("input[value='Yes, retry']")).to_have_count(0)
        finally:
            browser.close()

    final = api.order(order["id"])
    assert (final["status"], final["saga"]["status"]) == ("confirmed", "completed")
    assert audit(saga_id) == [("retry", "done", user.username)]
    # The email went out once, after the retry; nothing was charged or reserved twice.
    assert [(n["kind"], n["status"]) for n in api.notifications(order["id"])] == [("order_confirmed", "sent")]
    assert [p["status"] for p in api.payments(order["id"])] == ["captured"]


def test_bulk_retry_of_every_saga_with_the_same_failure(mail_outage_sagas: list[dict]) -> None:
    client, user = admin_client("retry_saga")
    chosen = mail_outage_sagas[1]["saga"]["id"]
    others = {order["saga"]["id"] for order in mail_outage_sagas[1:]}

    listed = client.get(CHANGELIST, {"fingerprint": MAIL_OUTAGE_FINGERPRINT, "status__exact": "needs_attention"})
    assert others <= {str(saga.pk) for saga in listed.context["cl"].result_list}
    form = {"action": "retry_same_failure", "_selected_action": [chosen]}
    confirmation = client.post(CHANGELIST, form)
    assert MAIL_OUTAGE_FINGERPRINT in confirmation.content.decode()
    assert all(saga_id in confirmation.content.decode() for saga_id in others)
    answer: dict[str, list[str]] = {}  # the confirmation's form, as the browser posts it
    for name, value in confirmation.context["hidden"]:
        answer.setdefault(name, []).append(str(value))

    first = client.post(CHANGELIST, {**answer, "post": "yes"}, follow=True)
    again = client.post(CHANGELIST, {**answer, "post": "yes"}, follow=True)

    assert any(m.startswith("Retried") for m in messages_of(first)), messages_of(first)
    assert any(m.startswith("No saga was retried") for m in messages_of(again)), messages_of(again)
    for order in mail_outage_sagas[1:]:
        final = wait_for(
            lambda o=order: (f := o["api"].order(o["id"]))["saga"]["status"] == "completed" and f,
            timeout=30,
            what="the retried saga to complete",
        )
        assert final["status"] == "confirmed"
        assert audit(order["saga"]["id"]) == [("retry", "done", user.username)]
        assert Notification.objects.filter(order_id=order["id"], status="sent").count() == 1
    on_hand, reserved = stock(mail_outage_sagas[0]["sku"])
    assert (on_hand, reserved) == (5, 3)  # three confirmed orders hold their units


def test_stock_is_adjusted_through_the_service_and_never_below_what_orders_hold(api: Api, sku: str) -> None:
    make_product(sku, on_hand=3)
    placed = api.place_order([(sku, 2)], token="tok_slow")
    wait_for(lambda: stock(sku)[1] == 2, timeout=30, what="the reservation")
    user = get_user_model().objects.create_superuser(username=f"admin-{uuid.uuid4().hex[:8]}", password="x")
    client = Client()
    client.force_login(user)
    product = Product.objects.get(sku=sku)
    url = f"/admin/inventory/product/{product.pk}/change/"
    form = {"name": product.name, "price": str(product.price)}

    refused = client.post(url, {**form, "on_hand_delta": "-2"})
    assert refused.status_code == 200  # the form again, with the reason
    assert "below the 2 units orders hold" in refused.content.decode()
    assert stock(sku) == (3, 2)

    received = client.post(url, {**form, "on_hand_delta": "5"})
    assert received.status_code == 302
    assert stock(sku) == (8, 2)
    assert api.wait_until_final(placed["id"])["status"] == "confirmed"
    assert stock(sku) == (8, 2)


def test_a_product_added_twice_at_once_keeps_the_first_ones_stock(sku: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two operators add the same SKU: both forms pass the uniqueness check before either
    saves. The second is refused; it does not set the first one's stock to its own."""
    make_product(sku, on_hand=7)  # the first operator's add, committed after the check below
    monkeypatch.setattr(ProductForm, "validate_unique", lambda self: None)
    user = get_user_model().objects.create_superuser(username=f"admin-{uuid.uuid4().hex[:8]}", password="x")
    client = Client()
    client.force_login(user)

    response = client.post(
        "/admin/inventory/product/add/", {"sku": sku, "name": "Same SKU", "price": "3.00", "on_hand": "1"}, follow=True
    )

    assert response.status_code == 200
    assert f"Not added: {sku} exists already" in response.content.decode()
    assert stock(sku) == (7, 0)
    assert Product.objects.get(sku=sku).name != "Same SKU"


def test_the_fake_providers_ledger_does_not_show_the_card_token(api: Api, sku: str) -> None:
    """A staff account that may view the provider's ledger saw each charge's card token
    there, which the saga's and the order's pages hide."""
    from payments.models import FakeProviderOperation

    make_product(sku, on_hand=2)
    order = api.wait_until_final(api.place_order([(sku, 1)], token="tok_mastercard")["id"], timeout=60)
    charge = FakeProviderOperation.objects.get(idempotency_key__startswith=order["saga"]["id"], kind="charge")
    assert charge.token == "tok_mastercard"
    client, user = admin_client()
    user.user_permissions.add(Permission.objects.get(codename="view_fakeprovideroperation"))
    page = client.get(f"/admin/payments/fakeprovideroperation/{charge.pk}/change/")
    assert page.status_code == 200
    assert charge.reference in page.content.decode()
    assert "tok_mastercard" not in page.content.decode()
