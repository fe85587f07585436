"""The HTTP contract: authentication, who sees what, and clear 400s for bad input."""

import json
import re
import uuid

import pytest
import requests
from django.test import Client

from common.drf import WriteRateThrottle
from devstack.topology import wait_for
from orders.api.views import OrderListCreateApi
from orders.models import Order
from payments.models import Payment
from saga.models import SagaAuditEntry

from .api import Api, make_product

pytestmark = pytest.mark.integration

ENDPOINTS = ["/api/orders/", "/api/products/", "/api/payments/", "/api/notifications/"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_anonymous_calls_get_401(api: Api, path: str) -> None:
    response = api.anonymous().get(path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Token"


def test_anonymous_order_creation_gets_401(api: Api) -> None:
    assert api.anonymous().post("/api/orders/", json={}).status_code == 401


def test_token_endpoint_issues_a_working_token(topology) -> None:
    from django.contrib.auth import get_user_model

    username, password = f"u-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    get_user_model().objects.create_user(username=username, password=password)

    bad = requests.post(f"{topology.base_url}/api/auth/token/", json={"username": username, "password": "x"})
    good = requests.post(f"{topology.base_url}/api/auth/token/", json={"username": username, "password": password})

    assert bad.status_code == 400
    assert good.status_code == 200
    assert Api(topology.base_url, good.json()["token"]).get("/api/orders/").status_code == 200


def test_customers_see_only_their_own_orders(topology, api: Api, sku: str) -> None:
    make_product(sku, on_hand=2)
    mine = api.place_order([(sku, 1)])
    other = Api.for_new_user(topology.base_url)

    assert other.get(f"/api/orders/{mine['id']}/").status_code == 404
    assert other.post(f"/api/orders/{mine['id']}/cancel/").status_code == 404
    assert other.get("/api/payments/", params={"order": mine["id"]}).status_code == 404
    assert other.get("/api/notifications/", params={"order": mine["id"]}).status_code == 404
    assert other.get("/api/orders/").json()["results"] == []
    assert [o["id"] for o in api.get("/api/orders/").json()["results"]] == [mine["id"]]
    api.wait_until_final(mine["id"])


VIEW_ALL = ("orders.view_order", "payments.view_payment", "notifications.view_notification")


def _running_order(customer: Api, sku: str) -> dict:
    """An order of `customer` whose saga is still before its pivot: the charge is in flight
    (tok_slow takes FAKE_PROVIDER_SLOW_SECONDS)."""
    make_product(sku, on_hand=5)
    placed = customer.place_order([(sku, 1)], token="tok_slow")
    wait_for(
        lambda: Payment.objects.filter(order_id=placed["id"], status="pending").exists(),
        timeout=30,
        what="the charge to be in flight",
    )
    return placed


def test_staff_without_permissions_are_customers_in_the_api(topology, api: Api, staff_api: Api, sku: str) -> None:
    """is_staff opens the admin, not other customers' data (issue 12: it answered 200/202)."""
    theirs = _running_order(api, sku)
    order_id = theirs["id"]

    assert staff_api.get(f"/api/orders/{order_id}/").status_code == 404
    assert staff_api.get("/api/payments/", params={"order": order_id}).status_code == 404
    assert staff_api.get("/api/notifications/", params={"order": order_id}).status_code == 404
    assert staff_api.get("/api/payments/").status_code == 400  # ?order= is required, as for customers
    assert staff_api.get("/api/notifications/").status_code == 400
    assert staff_api.get("/api/orders/").json()["results"] == []
    assert staff_api.post(f"/api/orders/{order_id}/cancel/").status_code == 404

    order = api.wait_until_final(order_id)
    assert (order["status"], order["cancel_requested"]) == ("confirmed", False)
    assert not SagaAuditEntry.objects.filter(saga_id=order["saga"]["id"]).exists()


def test_each_view_permission_opens_its_own_records(topology, api: Api, sku: str) -> None:
    make_product(sku, on_hand=5)
    order_id = api.place_order([(sku, 1)])["id"]
    api.wait_until_final(order_id)
    orders_only = Api.for_new_user(topology.base_url, is_staff=True, permissions=("orders.view_order",))
    reader = Api.for_new_user(topology.base_url, is_staff=True, permissions=VIEW_ALL)

    assert orders_only.get(f"/api/orders/{order_id}/").status_code == 200
    assert order_id in [o["id"] for o in orders_only.get("/api/orders/", params={"limit": 200}).json()["results"]]
    assert orders_only.get("/api/payments/", params={"order": order_id}).status_code == 404
    assert orders_only.get("/api/notifications/", params={"order": order_id}).status_code == 404

    assert [p["order_id"] for p in reader.payments(order_id)] == [order_id]
    assert [n["kind"] for n in reader.notifications(order_id)] == ["order_confirmed"]
    assert reader.get("/api/payments/").status_code == 200  # everything, without ?order=


def test_stopping_someone_elses_order_needs_the_admins_compensate_permission_and_is_audited(
    topology, api: Api, sku: str
) -> None:
    reader = Api.for_new_user(topology.base_url, is_staff=True, permissions=VIEW_ALL)
    operator = Api.for_new_user(topology.base_url, is_staff=True, permissions=(*VIEW_ALL, "saga.compensate_saga"))
    theirs = _running_order(api, sku)
    saga_id = theirs["saga"]["id"]

    refused = reader.post(f"/api/orders/{theirs['id']}/cancel/")
    assert refused.status_code == 403, refused.text
    assert not SagaAuditEntry.objects.filter(saga_id=saga_id).exists()

    stopped = operator.post(f"/api/orders/{theirs['id']}/cancel/")
    assert stopped.status_code == 202, stopped.text
    order = api.wait_until_final(theirs["id"])

    # The admin's compensate: the order fails ("stopped by our staff"), the customer is told,
    # and the audit log names the operator.
    assert (order["status"], order["saga"]["status"]) == ("failed", "compensated")
    assert order["failure_reason"] == "it was stopped by our staff"
    [entry] = SagaAuditEntry.objects.filter(saga_id=saga_id)
    assert (entry.action, entry.outcome, entry.user_id) == ("compensate", "done", operator.user_id)
    assert [n["kind"] for n in api.notifications(theirs["id"])] == ["order_failed"]
    # Once it is over, a second try is refused with a 409, and recorded like the admin's.
    again = operator.post(f"/api/orders/{theirs['id']}/cancel/")
    assert again.status_code == 409, again.text
    assert [e.outcome for e in SagaAuditEntry.objects.filter(saga_id=saga_id).order_by("id")] == ["done", "refused"]


def test_a_customer_cancelling_their_own_order_needs_no_permission_and_is_not_audited(api: Api, sku: str) -> None:
    mine = _running_order(api, sku)
    assert api.post(f"/api/orders/{mine['id']}/cancel/").status_code == 202
    order = api.wait_until_final(mine["id"])
    assert order["status"] == "cancelled"
    assert not SagaAuditEntry.objects.filter(saga_id=mine["saga"]["id"]).exists()


def test_products_list_stock_figures(api: Api, sku: str) -> None:
    make_product(sku, on_hand=7, price="3.25")
    products = {p["sku"]: p for p in api.get("/api/products/", params={"limit": 1000}).json()["results"]}
    assert products[sku] == {
        "sku": sku,
        "name": f"Test product {sku}",
        "price": "3.25",
        "on_hand": 7,
        "reserved": 0,
        "available": 7,
    }


def test_payments_need_an_order_filter_with_a_valid_id(api: Api) -> None:
    assert api.get("/api/payments/").json() == {"order": ["This query parameter is required: ?order=<order id>."]}
    assert api.get("/api/payments/", params={"order": "nope"}).status_code == 400
    assert api.get("/api/notifications/", params={"order": str(uuid.uuid4())}).status_code == 404


GOOD = {"email": "a@example.com", "items": [{"sku": "X", "quantity": 1}], "payment_token": "tok_visa"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in GOOD.items() if k != "items"}, "items"),
        ({**GOOD, "items": []}, "items"),
        ({**GOOD, "items": "MUG"}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": 0}]}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": -3}]}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": "two"}]}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": 1.5}]}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": 10**12}]}, "items"),
        ({**GOOD, "items": [{"sku": "X"}]}, "items"),
        ({**GOOD, "items": [{"sku": "", "quantity": 1}]}, "items"),
        ({**GOOD, "items": [{"sku": "X" * 65, "quantity": 1}]}, "items"),
        ({**GOOD, "items": [{"sku": "X", "quantity": 1}, {"sku": "X", "quantity": 2}]}, "items"),
        ({**GOOD, "items": [{"sku": f"S{i}", "quantity": 1} for i in range(51)]}, "items"),
        ({**GOOD, "email": "not-an-email"}, "email"),
        ({k: v for k, v in GOOD.items() if k != "email"}, "email"),
        ({**GOOD, "payment_token": "4242424242424242"}, "payment_token"),
        ({**GOOD, "payment_token": 42}, "payment_token"),
        ({**GOOD, "phone": "555-1234"}, "phone"),
    ],
)
def test_bad_order_input_gets_a_400_naming_the_field(api: Api, body: dict, field: str) -> None:
    response = api.post("/api/orders/", json=body)
    assert response.status_code == 400, response.text
    assert field in response.json()
    assert not Order.objects.filter(user_id=api.user_id).exists()


@pytest.mark.parametrize("raw", ['{"email": ', "[]", "null", '"text"', "\x00\xff"])
def test_malformed_json_gets_a_400(api: Api, raw: str) -> None:
    response = api.post("/api/orders/", data=raw.encode("latin-1"), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")


def test_non_json_content_type_gets_a_415(api: Api) -> None:
    response = api.post(
        "/api/orders/", data="email=a@b.c", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 415


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "ünïcode"])
def test_bad_idempotency_key_gets_a_400(api: Api, key: str) -> None:
    response = api.post("/api/orders/", json=GOOD, headers={"Idempotency-Key": key.encode().decode("latin-1")})
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()


def test_unknown_order_is_404_and_malformed_id_is_404(api: Api) -> None:
    assert api.get(f"/api/orders/{uuid.uuid4()}/").status_code == 404
    assert api.get("/api/orders/not-a-uuid/").status_code == 404


_IDS = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMES = re.compile(r"\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d)")


def _answer(topology, monkeypatch, *, hot: bool, posts: list[tuple[dict, dict]]) -> tuple:
    """The last of `posts` ((body, headers) each) as one new customer, with or without the
    hot path: its status, headers and body, with ids and times masked. A replay's body is
    the order as it is by then (its saga runs meanwhile): only its fields, and that it is
    the first post's order."""
    monkeypatch.setattr(OrderListCreateApi, "hot_path", hot)
    client = Client(HTTP_AUTHORIZATION=f"Token {Api.for_new_user(topology.base_url).token}")
    answers = [
        client.post("/api/orders/", json.dumps(body), content_type="application/json", headers=headers)
        for body, headers in posts
    ]
    response = answers[-1]
    shown = {name: value for name, value in response.headers.items() if name not in ("Content-Length", "Location")}
    location = _IDS.sub("<id>", response.headers.get("Location", ""))
    if response.headers.get("Idempotent-Replayed"):
        assert response.json()["id"] == answers[0].json()["id"]
        return response.status_code, shown, location, sorted(response.json())
    return response.status_code, shown, location, _TIMES.sub("<time>", _IDS.sub("<id>", response.content.decode()))


@pytest.mark.parametrize(
    "case", ["plain", "two lines and a phone", "new key", "replayed key", "reused key", "unknown sku", "rate limited"]
)
def test_the_hot_path_answers_as_rest_framework_does(topology, monkeypatch, sku: str, case: str) -> None:
    """orders.api.views.OrderListCreateApi._post_plain: the same answer as the declared view."""
    make_product(sku, on_hand=100)
    make_product(f"{sku}-2", on_hand=100)
    order = {"email": "a@example.com", "items": [{"sku": sku, "quantity": 2}], "payment_token": "tok_visa"}
    key = {"Idempotency-Key": "k-1"}
    posts = {
        "plain": [(order, {})],
        "two lines and a phone": [
            ({**order, "phone": "+14155550123", "items": [*order["items"], {"sku": f"{sku}-2", "quantity": 1}]}, {})
        ],
        "new key": [(order, key)],
        "replayed key": [(order, key), (order, key)],
        "reused key": [(order, key), ({**order, "payment_token": "tok_mastercard"}, key)],
        "unknown sku": [({**order, "items": [{"sku": f"{sku}-none", "quantity": 1}]}, {})],
        "rate limited": [(order, {}), (order, {})],
    }[case]
    if case == "rate limited":
        monkeypatch.setattr(WriteRateThrottle, "THROTTLE_RATES", {"order_create": "1/minute"})
    declared = _answer(topology, monkeypatch, hot=False, posts=posts)
    by_the_view: list[str] = []
    declared_post = OrderListCreateApi.post
    monkeypatch.setattr(
        OrderListCreateApi, "post", lambda view, request: by_the_view.append(case) or declared_post(view, request)
    )
    hot = _answer(topology, monkeypatch, hot=True, posts=posts)
    assert hot == declared
    assert declared[0] == {"unknown sku": 400, "reused key": 422, "rate limited": 429}.get(case, 202)
    # Every post went the hot way (the declared view's `post` never ran; the rate limit's
    # refusal comes from REST framework before any view method).
    assert by_the_view == []


def test_the_web_cpu_measurement_places_orders_both_ways(topology) -> None:
    """bench.web_cpu (BENCHMARKS.md's in-process figures) measures what it says: real orders,
    accepted by each way, and the hot path left on."""
    from bench.run import SKUS
    from bench.web_cpu import measure

    make_product(SKUS[0], on_hand=1000)
    per_round = measure(rounds=2, orders=3, token=Api.for_new_user(topology.base_url).token, warm_up=1)
    assert {way: len(values) for way, values in per_round.items()} == {"declared (REST framework)": 2, "hot path": 2}
    assert all(value > 0 for values in per_round.values() for value in values)
    assert OrderListCreateApi.hot_path is True
