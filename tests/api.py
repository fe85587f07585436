"""A small HTTP client for the system tests, and the saga-aware waits they share."""

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import requests
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from common.tokens import api_token_create
from devstack.topology import wait_for
from inventory.models import Product
from inventory.services import product_upsert

FINAL_ORDER_STATUSES = {"confirmed", "failed", "cancelled"}
FINAL_SAGA_STATUSES = {"completed", "compensated", "needs_attention"}


@dataclass
class Api:
    base_url: str
    token: str | None
    user_id: int | None = None

    @classmethod
    def for_new_user(cls, base_url: str, *, is_staff: bool = False, permissions: tuple[str, ...] = ()) -> "Api":
        """A new user with a token and, optionally, permissions ("app_label.codename")."""
        user = get_user_model().objects.create_user(
            username=f"user-{uuid.uuid4().hex[:12]}", password=uuid.uuid4().hex, is_staff=is_staff
        )
        for permission in permissions:
            app_label, codename = permission.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return cls(base_url, api_token_create(user=user)[1], user.id)

    def anonymous(self) -> "Api":
        return Api(self.base_url, None)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        return requests.request(method, f"{self.base_url}{path}", headers=headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def place_order(self, items: list[tuple[str, int]], token: str = "tok_visa", **extra: Any) -> dict:
        body = {
            "email": "buyer@example.com",
            "items": [{"sku": sku, "quantity": quantity} for sku, quantity in items],
            "payment_token": token,
            **extra,
        }
        response = self.post("/api/orders/", json=body)
        assert response.status_code == 202, response.text
        return response.json()

    def order(self, order_id: str) -> dict:
        response = self.get(f"/api/orders/{order_id}/")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_until_final(self, order_id: str, timeout: float = 60) -> dict:
        """The order once it and its saga have both finished (or need an operator)."""

        def final() -> dict | None:
            order = self.order(order_id)
            done = order["status"] in FINAL_ORDER_STATUSES and order["saga"]["status"] in FINAL_SAGA_STATUSES
            return order if done else None

        return wait_for(final, timeout=timeout, what=f"order {order_id} to finish")

    def payments(self, order_id: str) -> list[dict]:
        response = self.get("/api/payments/", params={"order": order_id})
        assert response.status_code == 200, response.text
        return response.json()["results"]

    def notifications(self, order_id: str) -> list[dict]:
        response = self.get("/api/notifications/", params={"order": order_id})
        assert response.status_code == 200, response.text
        return response.json()["results"]


def make_product(sku: str, *, on_hand: int, price: str = "10.00") -> Product:
    return product_upsert(sku=sku, name=f"Test product {sku}", price=Decimal(price), on_hand=on_hand)


def stock(sku: str) -> tuple[int, int]:
    """(on_hand, reserved) as the inventory database holds them now."""
    product = Product.objects.get(sku=sku)
    return product.on_hand, product.reserved


def steps_by_name(order: dict) -> dict[str, dict]:
    return {step["name"]: step for step in order["saga"]["steps"]}
