"""A small HTTP client for the system tests, and the saga-aware waits and probes they share."""

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import requests
from celery.result import AsyncResult
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.models import OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from django_celery_results.models import TaskResult

from common.tokens import api_token_create
from devstack.topology import BASE_DIR, WORKERS, wait_for
from inventory.models import Product, Reservation
from inventory.services import product_upsert
from orders.models import Order
from orders_project.celery import app
from saga.definition import get_definition
from saga.engine import build_chain, task_id_for
from saga.models import SagaInstance, SagaStep, StepPhase, StepStatus

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
        kwargs.setdefault("timeout", 30)
        return requests.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def place_order(
        self, items: list[tuple[str, int]], token: str = "tok_visa", *, timeout: float = 30, **extra: Any
    ) -> dict:
        body = {
            "email": "buyer@example.com",
            "items": [{"sku": sku, "quantity": quantity} for sku, quantity in items],
            "payment_token": token,
            **extra,
        }
        response = self.post("/api/orders/", json=body, timeout=timeout)
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


def shelf(sku: str) -> tuple[int, int, int]:
    """(on_hand, reserved, sold) as the inventory database holds them now, in one read."""
    sold = Subquery(
        Reservation.objects.filter(sku=OuterRef("sku"), status=Reservation.Status.SOLD)
        .values("sku")
        .annotate(total=Sum("quantity"))
        .values("total")
    )
    product = Product.objects.annotate(sold=Coalesce(sold, 0)).get(sku=sku)
    return product.on_hand, product.reserved, product.sold


def stock(sku: str) -> tuple[int, int]:
    """(units received, units taken by orders) as the inventory database holds them now:
    on hand and reserved, each plus what was sold. A confirmed order's reservation becomes
    a sale a sweep or two after the order is confirmed (saga.settlement); these two
    numbers are the same before and after, so a test of something else need not wait for
    it. `shelf` gives the plain counters."""
    on_hand, reserved, sold = shelf(sku)
    return on_hand + sold, reserved + sold


def wait_settled(saga_ids: Any, timeout: float = 60) -> None:
    """Until every saga in `saga_ids` that passed its pivot is settled: its confirmed
    order's stock sold (saga.settlement, a sweep or two after the pivot)."""
    ids = [str(saga_id) for saga_id in saga_ids]
    wait_for(
        lambda: (
            not SagaInstance.objects.filter(
                id__in=ids, pivot_committed_at__isnull=False, settled_at__isnull=True
            ).exists()
        ),
        timeout=timeout,
        what="the confirmed orders' sales to be settled",
    )


def steps_by_name(order: dict) -> dict[str, dict]:
    return {step["name"]: step for step in order["saga"]["steps"]}


def held_saga(step: str, *, context: Mapping[str, Any], **order: Any) -> SagaInstance:
    """A place_order saga stopped at `step`, as the coordinator leaves it when it has published
    that step (running, deadline set; the steps before it succeeded), with nothing published:
    the test publishes the step's message itself (`publish_step`). `order` overrides fields of
    the saga's order (pending, 10.00 USD)."""
    order_row = Order.objects.create(
        **{"user_id": 0, "email": "held@example.com", "payment_token": "tok_visa", "total": 10, "currency": "USD"}
        | order
    )
    definition = get_definition("place_order")
    index = definition.forward_index(step)
    saga_id = uuid.uuid4()
    now = timezone.now()
    saga = SagaInstance.objects.create(
        id=saga_id,
        definition=definition.name,
        definition_version=definition.version,
        order_id=order_row.id,
        current_step=step,
        context={"saga_id": str(saga_id), "order_id": str(order_row.id), **context},
        pivot_committed_at=now if definition.is_after_pivot(step) else None,
    )
    for position, spec in enumerate(definition.steps):
        row = SagaStep(saga=saga, phase=StepPhase.FORWARD, position=position, name=spec.name, task_name=spec.task)
        if position < index:
            row.status = StepStatus.SUCCEEDED
        elif position == index:
            row.status, row.queued_at = StepStatus.RUNNING, now
            row.deadline_at = now + timedelta(seconds=spec.deadline_seconds)
            row.celery_task_id = task_id_for(saga_id, spec.name, saga.generation)
        row.save()
    return saga


def publish_step(saga: SagaInstance) -> AsyncResult:
    """Publish the saga's current step as the coordinator does (saga.engine): its signed
    context, its task id, its `link_error` to the coordinator."""
    definition = get_definition(saga.definition, saga.definition_version)
    spec = definition.steps[definition.forward_index(saga.current_step)]
    return build_chain(
        (spec,), saga_id=saga.id, generation=saga.generation, phase="forward", context=saga.context
    ).apply_async()


# One task per queue that acts only on a message the coordinator signed.
GUARDED_TASKS = {
    "inventory.reserve": "inventory",
    "payments.charge": "payments",
    "orders.confirm": "orders",
    "notifications.notify": "notifications",
    "saga.step_succeeded": "saga",
}


def send_forged_messages(copies: int = 1) -> list[tuple[str, AsyncResult]]:
    """`copies` forged messages to each service's queue, for a saga nobody started: each
    must end InvalidMessage, stored by its worker in the result backend (`assert_refused`)."""
    sent = []
    for _ in range(copies):
        for task, queue in GUARDED_TASKS.items():
            ctx = {
                "saga_id": str(uuid.uuid4()),
                "order_id": str(uuid.uuid4()),
                "items": [{"sku": "T-FORGED", "quantity": 1}],
                "email": "forged@example.com",
                "payment_token": "tok_visa",
                "currency": "USD",
                "amount": "10.00",
                "outcome": "confirmed",
            }
            # A forged authority; the coordinator's report takes the step's output (a sealed context) first.
            kwargs = (
                {"saga_id": ctx["saga_id"], "step": "reserve_inventory"}
                if queue == "saga"
                else {"authority": "forged-0123456789abcdefghijklmnopqrstuvwxyz"}
            )
            sent.append((task, app.send_task(task, args=[ctx], kwargs=kwargs, queue=queue, ignore_result=False)))
    return sent


# How often a test polls the result backend for a task's result. Celery's default (0.5 s)
# made every wait cost up to half a second: tests that check dozens of messages one by one
# spent most of their time between polls.
RESULT_POLL_SECONDS = 0.05


def result_wait(result: AsyncResult, timeout: float, *, propagate: bool = False) -> Any:
    """The task's return value (or, without `propagate`, its exception) once stored."""
    return result.get(timeout=timeout, interval=RESULT_POLL_SECONDS, propagate=propagate)


def assert_refused(sent: list[tuple[str, AsyncResult]], timeout: float = 60) -> None:
    for task, result in sent:
        result_wait(result, timeout)
        assert (task, result.state, type(result.result).__name__) == (task, "FAILURE", "InvalidMessage"), result.result


CONNECTION_ERRORS = {"OperationalError", "InterfaceError"}


def stale_connection_failures(since: datetime) -> list[tuple[str, str]]:
    """(task, error) of every task that ended FAILURE since `since` on a database connection
    it already held, as the workers stored them (every failure is stored). A task that could
    not connect while the server was down ("connection failed: ...", or a BackendStoreError
    once the result backend's retries ran out: the periodic sweep during a restart) is not
    one: that is the outage itself, not a connection it left behind."""
    rows = TaskResult.objects.filter(status="FAILURE", date_done__gte=since).values_list("task_name", "result")
    failures = []
    for name, result in rows:
        stored = json.loads(result or "{}") or {}
        message = " ".join(map(str, stored.get("exc_message") or ()))
        if stored.get("exc_type") in CONNECTION_ERRORS and not message.startswith("connection failed:"):
            failures.append((name, f"{stored['exc_type']}: {message}"))
    return failures


def broker_idle() -> bool:
    """Nothing waits in any queue and, with Redis, nothing is held unacknowledged (what a
    broker restart leaves there comes back only after the visibility timeout): no message
    of an earlier test arrives during a later one."""
    with app.connection_for_read() as connection:
        if connection.transport.driver_type == "redis":
            channel = connection.default_channel
            client = channel.client
            return not client.hlen(channel.unacked_key) and not any(client.llen(queue) for queue in WORKERS)
        for queue in WORKERS:
            # A channel each: a queue that is not there closes the channel that asked.
            with connection.channel() as channel:
                if channel.queue_declare(queue=queue, passive=True).message_count:
                    return False
        return True


@contextmanager
def another_process() -> Iterator[tuple[subprocess.Popen, str]]:
    """A live process of this host and its identity, as it would write it in a claim."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from common.liveness import process_identity; print(process_identity(), flush=True); "
            "time.sleep(120)",
        ],
        cwd=BASE_DIR,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield child, child.stdout.readline().strip()
    finally:
        child.kill()
        child.wait()
