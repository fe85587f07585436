"""Malformed and forged messages, sent straight to each service's queue, change nothing.

Each task validates its message before acting (common.steps, common.signing and the
tasks themselves): a message that is not an object, lacks a field, has a field of the
wrong type, carries no authority of the coordinator for this very task (forged, another
step's, another phase's) or is not what that authority covers (altered items, amount,
outcome) fails with InvalidMessage, is logged by the worker, and leaves every database as
it was. And nothing a step returns, stores or reports carries a customer's data or
anything that could be sent again.
"""

import ast
import json
import re
import threading
import uuid
from datetime import timedelta

import pytest
from django.db import connections
from django.utils import timezone
from django_celery_results.models import TaskResult

from common.exceptions import BusinessFailure, InvalidMessage, StepRefused
from common.signing import FAILURE_SEAL_FIELD, Authority, context_digest, failure_report_mint, failure_seal_valid, seal
from devstack.topology import Topology, wait_for
from orders.models import Order
from orders.saga import PLACE_ORDER
from orders_project.celery import app
from saga.engine import build_chain, step_name_of
from saga.models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus

from .api import Api, make_product, result_wait, stock

pytestmark = [pytest.mark.integration, pytest.mark.broker]

SERVICE_DATABASES = ("orders", "inventory", "payments", "notifications")
# In the shared database only these are business data: Celery's results and beat's
# schedule change all the time (and record these very failures).
DEFAULT_TABLES = ("auth_user", "common_apitoken")


def database_snapshot() -> dict[str, str]:
    """A digest of every row of every table of the service databases (and the users), once
    no recent saga's settlement is in flight: a confirmed order's stock becomes a sale a
    sweep or two after its saga completes (saga.settlement), which would change the digest
    of a system that is otherwise at rest. (An older one still unsettled is one whose batch
    an earlier fault test lost: it is sent again only after the settlement's deadline.)"""
    recent = timezone.now() - timedelta(minutes=2)
    wait_for(
        lambda: not SagaInstance.objects.filter(pivot_committed_at__gte=recent, settled_at__isnull=True).exists(),
        timeout=60,
        what="the settlement of every order confirmed in the last two minutes",
    )
    digests = {}
    for alias in ("default", *SERVICE_DATABASES):
        connection = connections[alias]
        tables = DEFAULT_TABLES if alias == "default" else connection.introspection.table_names()
        with connection.cursor() as cursor:
            for table in tables:
                name = connection.ops.quote_name(table)
                cursor.execute(f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {name} t")
                digests[f"{alias}.{table}"] = cursor.fetchone()[0]
    return digests


def running_saga(sku: str) -> SagaInstance:
    """An order whose saga is running, stopped before its first step (nothing published)."""
    order = Order.objects.create(
        user_id=0, email="held@example.com", payment_token="tok_visa", total=10, currency="USD"
    )
    context = {
        "email": order.email,
        "phone": "",
        "items": [{"sku": sku, "quantity": 1, "unit_price": "10.00"}],
        "total": "10.00",
        "payment_token": order.payment_token,
        "currency": "USD",
    }
    saga_id = uuid.uuid4()
    saga = SagaInstance.objects.create(
        id=saga_id,
        definition="place_order",
        order_id=order.id,
        current_step="reserve_inventory",
        context={**context, "saga_id": str(saga_id), "order_id": str(order.id)},
    )
    SagaStep.objects.create(
        saga=saga,
        phase=StepPhase.FORWARD,
        position=0,
        name="reserve_inventory",
        task_name="inventory.reserve",
        status=StepStatus.RUNNING,
        queued_at=timezone.now(),
    )
    return saga


def seal_authority(saga: SagaInstance, step: str, phase: str = "forward") -> Authority:
    """The authority a step of `saga` acted on, as common.steps seals its output with."""
    return Authority(str(saga.id), step, "", phase, saga.generation, context_digest(saga.context), "")


def signed_output(saga: SagaInstance) -> dict:
    """A real-looking output of the saga's first step (a test holds SECRET_KEY)."""
    return seal(dict(saga.context), seal_authority(saga, "reserve_inventory"))


def coordinator_message(task: str, ctx: dict, *, phase: str = "", generation: int = 0) -> tuple[list, dict]:
    """(args, kwargs) of `task`'s message as the coordinator would send it over `ctx`, as
    the first step of a chain (a coordinator bug: only the task's own checks stop it)."""
    step = next(s for s in PLACE_ORDER.steps + PLACE_ORDER.compensation_steps() if s.task == task)
    phase = phase or ("forward" if step in PLACE_ORDER.steps else "compensation")
    sig = build_chain((step,), saga_id=ctx.get("saga_id"), generation=generation, phase=phase, context=ctx)
    return list(sig.args), dict(sig.kwargs)


def chain_messages(saga: SagaInstance, plan, *, phase: str, generation: int) -> dict[str, tuple[list, dict]]:
    """{task: (args, kwargs)} of each step of the saga's chain, each as its participant
    receives it: real authorities, and the previous step's real sealed output (each step
    is run again for it: idempotent, it returns what it returned the first time)."""
    canvas = build_chain(plan, saga_id=saga.id, generation=generation, phase=phase, context=saga.context)
    signatures = canvas.tasks if hasattr(canvas, "tasks") else [canvas]
    messages, args = {}, list(signatures[0].args)
    for sig in signatures:
        kwargs = dict(sig.kwargs)
        messages[sig.task] = (args, kwargs)
        result = app.send_task(sig.task, args=args, kwargs=kwargs, ignore_result=False)
        output = result_wait(result, 60)
        assert result.state == "SUCCESS", (sig.task, result.result)
        args = [output]
    return messages


def test_malformed_and_forged_messages_are_rejected_on_every_queue(api: Api, topology: Topology, sku: str) -> None:
    make_product(sku, on_hand=5)
    confirmed = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    assert confirmed["status"] == "confirmed"
    real = SagaInstance.objects.get(id=confirmed["saga"]["id"])
    held = running_saga(sku)
    held_ctx = dict(held.context)
    participant_tasks = {
        "inventory.reserve": "inventory",
        "inventory.release": "inventory",
        "payments.charge": "payments",
        "payments.refund": "payments",
        "orders.confirm": "orders",
        "orders.fail": "orders",
        "notifications.notify": "notifications",
    }
    compensations = {"inventory.release", "payments.refund", "orders.fail"}

    cases: list[tuple[str, str, list, dict, type[Exception], str]] = []
    for task, queue in participant_tasks.items():
        [ctx], _ = coordinator_message("inventory.reserve", held_ctx)
        other_task = "payments.charge" if task != "payments.charge" else "orders.confirm"
        other_phase = "compensation" if task not in compensations else "forward"
        other_phase_task = "payments.refund" if task not in compensations else "inventory.reserve"
        _, other_step = coordinator_message(other_task, held_ctx)
        _, other_phase_kwargs = coordinator_message(other_phase_task, held_ctx, phase=other_phase)
        _, own_kwargs = coordinator_message(task, held_ctx)
        cases += [
            (task, queue, ["not a saga context"], {}, InvalidMessage, "expects a saga context object"),
            (task, queue, [ctx], {}, InvalidMessage, "no step authority"),
            (task, queue, [ctx], {"authority": "forged-0123456789abcdefghijklmnopqrstuvwxyz"}, InvalidMessage, "bad"),
            # Another step's authority, and another phase's, for this very saga and context.
            (task, queue, [ctx], other_step, InvalidMessage, f"not {task}"),
            (task, queue, [ctx], other_phase_kwargs, InvalidMessage, f"not {task}"),
            # Its own authority, with more of the product ordered, or another saga's context.
            (task, queue, [{**ctx, "items": [{"sku": sku, "quantity": 5}]}], own_kwargs, InvalidMessage, "not the one"),
            (task, queue, [dict(real.context)], own_kwargs, InvalidMessage, "not for saga"),
        ]
    base = {**held.context, "amount": "10.00", "outcome": "confirmed"}

    def bug(task: str, queue: str, ctx: dict, error: type[Exception], text: str) -> tuple:
        return (task, queue, *coordinator_message(task, ctx), error, text)

    cases += [
        # Authorised, but with a field of the wrong type or missing.
        bug(
            "inventory.reserve", "inventory", {**base, "items": [{"sku": sku, "quantity": "1"}]}, InvalidMessage, "line"
        ),
        bug("inventory.reserve", "inventory", {**base, "items": [[sku, 1]]}, InvalidMessage, "malformed"),
        bug("inventory.release", "inventory", {**base, "saga_id": "not-a-uuid"}, InvalidMessage, "saga_id"),
        bug("payments.charge", "payments", {**base, "total": "lots"}, InvalidMessage, "total"),
        bug("payments.charge", "payments", {**base, "total": "-5"}, InvalidMessage, "total"),
        bug("payments.charge", "payments", {**base, "payment_token": None}, InvalidMessage, "payment_token"),
        bug("payments.refund", "payments", {**base, "saga_id": 42}, InvalidMessage, "saga_id"),
        bug("orders.confirm", "orders", {k: v for k, v in base.items() if k != "total"}, InvalidMessage, "total"),
        bug("orders.fail", "orders", {**base, "order_id": None}, InvalidMessage, "order_id"),
        bug("notifications.notify", "notifications", {**base, "outcome": "bogus"}, InvalidMessage, "outcome"),
        bug("notifications.notify", "notifications", {**base, "email": ["x@example.com"]}, InvalidMessage, "email"),
        # The coordinator's authority for an undo, in a forward chain, and the reverse.
        (
            "payments.refund",
            "payments",
            *coordinator_message("payments.refund", base, phase="forward"),
            InvalidMessage,
            "compensation phase",
        ),
        (
            "inventory.reserve",
            "inventory",
            *coordinator_message("inventory.reserve", base, phase="compensation"),
            InvalidMessage,
            "forward phase",
        ),
        # The held saga's own message, sent to a compensation: it is not compensating.
        bug("orders.fail", "orders", base, StepRefused, "is not compensating"),
        # The coordinator: malformed reports, and success reports that no step sent.
        ("saga.step_succeeded", "saga", [{}], {"saga_id": "not-a-uuid", "step": "x"}, InvalidMessage, "saga_id"),
        (
            "saga.step_succeeded",
            "saga",
            [{}],
            {"saga_id": str(held.id), "step": ["reserve_inventory"]},
            InvalidMessage,
            "step",
        ),
        (
            "saga.step_succeeded",
            "saga",
            ["done"],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "no step output",
        ),
        (
            "saga.step_succeeded",
            "saga",
            [{**base, "saga_id": str(held.id)}],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "no step output seal",
        ),
        (
            "saga.step_succeeded",
            "saga",
            # A real step output, of another saga.
            [signed_output(real)],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "another saga",
        ),
        (
            "saga.step_succeeded",
            "saga",
            # The held saga's context sealed as another step's output.
            [seal(held_ctx, seal_authority(held, "charge_payment"))],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "output of charge_payment",
        ),
        (
            "saga.step_failed",
            "saga",
            [42],
            {"saga_id": str(held.id), "step": "reserve_inventory"},
            InvalidMessage,
            "task_id",
        ),
        (
            "saga.step_failed",
            "saga",
            ["some-task"],
            {"saga_id": "0", "step": "reserve_inventory"},
            InvalidMessage,
            "saga_id",
        ),
    ]

    # A failure report the coordinator did not mint, even for a real running saga and a
    # real stored failure (another saga's declined charge: a decline is final, so the refund
    # would be skipped), is refused: it must not make a healthy saga compensate.
    declined = finished_saga(api, api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"], "compensated")
    declined_charge = f"{declined.id}-charge_payment-g0"
    assert TaskResult.objects.filter(task_id=declined_charge, status="FAILURE").exists()
    cases += [
        (
            "saga.step_failed",
            "saga",
            [declined_charge],
            {"saga_id": str(held.id), "step": "charge_payment"},
            InvalidMessage,
            "no failure report authority",
        ),
        (
            "saga.step_failed",
            "saga",
            [declined_charge],
            {
                "saga_id": str(held.id),
                "step": "charge_payment",
                "authority": failure_report_mint(saga_id=declined.id, step="charge_payment", task_id=declined_charge),
            },
            InvalidMessage,
            "not",
        ),
    ]

    def unfinished() -> list[str]:
        sagas = SagaInstance.objects.filter(status__in=[SagaStatus.RUNNING, SagaStatus.COMPENSATING]).exclude(
            id=held.id
        )
        return [
            f"{s.id} {s.status} at {s.current_step} (updated {s.updated_at:%H:%M:%S}): "
            + ", ".join(f"{t.name}={t.status}/{t.celery_task_id.rsplit('-', 1)[-1]}" for t in s.steps.all())
            for s in sagas.prefetch_related("steps")
        ]

    try:
        wait_for(lambda: not unfinished(), timeout=120, what="earlier tests' sagas to finish")
    except TimeoutError as timed_out:
        raise AssertionError(f"{timed_out}: " + "; ".join(unfinished())) from None
    before = database_snapshot()

    sent = [
        (app.send_task(task, args=args, kwargs=kwargs, queue=queue, ignore_result=False), task, queue, error, text)
        for task, queue, args, kwargs, error, text in cases
    ]
    # With the coordinator's authority, but no failure stored for its task id: logged and
    # ignored (Celery stores the failure before it sends the errback).
    unknown_task = f"{held.id}-reserve_inventory-g0"
    unknown = app.send_task(
        "saga.step_failed",
        args=[unknown_task],
        kwargs={
            "saga_id": str(held.id),
            "step": "reserve_inventory",
            "authority": failure_report_mint(saga_id=held.id, step="reserve_inventory", task_id=unknown_task),
        },
        queue="saga",
        ignore_result=False,
    )

    def logged(queue: str, line: str) -> bool:
        return line in topology.processes[queue].log_path.read_text(errors="replace")

    for result, task, queue, error, text in sent:
        result_wait(result, 60)
        assert result.state == "FAILURE", (task, result.state, result.result)
        assert isinstance(result.result, error) and text in str(result.result), (task, result.result)
        # A refusal is a business outcome (the task's `throws`: common.steps), logged at
        # INFO; a malformed or forged message is an error.
        kind = "expected" if isinstance(result.result, BusinessFailure) else "unexpected"
        line = f"{task}[{result.id}] raised {kind}: {type(result.result).__name__}"
        wait_for(lambda queue=queue, line=line: logged(queue, line), timeout=10, what=f"the {queue} worker's log")
    result_wait(unknown, 60, propagate=True)
    assert unknown.state == "SUCCESS"
    wait_for(lambda: logged("saga", "has no stored failure; ignored"), timeout=10, what="the saga worker's log")

    assert database_snapshot() == before
    held.refresh_from_db()
    assert (held.status, held.current_step) == ("running", "reserve_inventory")
    assert Order.objects.get(id=held.order_id).status == "pending"
    # Not a real order: nothing may pick it up later.
    Order.objects.filter(id=held.order_id).delete()
    held.delete()


def send_and_expect(task: str, args: list, kwargs: dict, error: type[Exception] = InvalidMessage) -> Exception:
    result = app.send_task(task, args=args, kwargs=kwargs, ignore_result=False)
    result_wait(result, 60)
    assert result.state == "FAILURE", (task, result.state, result.result)
    assert isinstance(result.result, error), (task, result.result)
    return result.result


def finished_saga(api: Api, order_id: str, status: str) -> SagaInstance:
    order = api.wait_until_final(order_id, timeout=90)
    saga_id = order["saga"]["id"]
    return wait_for(
        lambda: SagaInstance.objects.filter(id=saga_id, status=status).first(),
        timeout=60,
        what=f"saga {saga_id} {status}",
    )


def logged_step_results(topology: Topology, saga_id: str) -> list[dict]:
    """What the workers' logs show of the saga's steps' results, read back as a message
    the way someone holding the logs would: every field a line shows."""
    results = []
    for process in topology.processes.values():
        for line in process.log_path.read_text(errors="replace").splitlines():
            if f"[{saga_id}-" not in line or " succeeded in " not in line:
                continue
            shown = line.split(" succeeded in ", 1)[1]
            # A dict's repr (truncated by Celery past 1024 characters or 3 levels), or
            # `key=value` pairs.
            value: dict = dict(re.findall(r"'(\w+)': '([^']*)'", shown)) or dict(re.findall(r"(\w+)=([\w.-]+)", shown))
            if items := re.search(r"'items': (\[[^\]]*\])", shown):
                value["items"] = ast.literal_eval(items.group(1))
            if value:
                results.append(value)
    return results


def test_a_logged_forward_message_replayed_as_a_compensation_refunds_and_releases_nothing(
    api: Api, topology: Topology, sku: str
) -> None:
    make_product(sku, on_hand=5)
    saga = finished_saga(api, api.place_order([(sku, 2)])["id"], "completed")
    logged = wait_for(
        lambda: (found := logged_step_results(topology, str(saga.id))) and len(found) >= 4 and found,
        timeout=10,
        what="the forward steps' success lines",
    )
    before = database_snapshot()

    for ctx in logged:
        for task in ("payments.refund", "inventory.release"):
            send_and_expect(task, [ctx], {})

    assert database_snapshot() == before
    assert stock(sku) == (5, 2)
    assert [p["status"] for p in api.payments(str(saga.order_id))] == ["captured"]


def test_replayed_altered_and_misdirected_step_messages_are_refused_on_every_queue(
    api: Api, topology: Topology, sku: str
) -> None:
    """The real messages of a confirmed and a compensated saga (real authorities, each
    step's real sealed output), sent where they do not belong or altered, change nothing."""
    make_product(sku, on_hand=5)
    confirmed = finished_saga(api, api.place_order([(sku, 2)])["id"], "completed")
    declined = finished_saga(api, api.place_order([(sku, 1)], token="tok_chargeDeclined")["id"], "compensated")
    forward = chain_messages(confirmed, PLACE_ORDER.steps, phase="forward", generation=confirmed.generation)
    compensation = chain_messages(
        declined, PLACE_ORDER.compensation_steps(), phase="compensation", generation=declined.generation
    )
    queues = {
        "inventory.reserve",
        "inventory.release",
        "payments.charge",
        "payments.refund",
        "orders.confirm",
        "orders.fail",
        "notifications.notify",
    }
    before = database_snapshot()

    for messages in (forward, compensation):
        for task, (args, kwargs) in messages.items():
            # Another step's message (of either phase) on every other queue.
            for other in queues - {task}:
                assert f"not {other}" in str(send_and_expect(other, args, kwargs))
            # Its own queue, with what it acts on altered.
            [ctx] = args
            for field, value in [("amount", "0.01"), ("outcome", "cancelled"), ("outcome", "confirmed")]:
                if ctx.get(field, value) != value:
                    error = str(send_and_expect(task, [{**ctx, field: value}], kwargs))
                    assert "altered" in error or "not the one" in error, (task, field, error)
    # The confirmed saga's forward messages as compensations, its refund and release
    # authorities minted by nobody: what a Flower login could send.
    for args, kwargs in forward.values():
        send_and_expect("payments.refund", args, kwargs)
        send_and_expect("inventory.release", args, kwargs)

    assert database_snapshot() == before
    assert stock(sku) == (5, 2)
    assert [p["status"] for p in api.payments(str(confirmed.order_id))] == ["captured"]


class EventCapture:
    """Every Celery event (what Flower shows) while it runs, as JSON text."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.receiver = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with app.connection_for_read() as connection:
            self.receiver = app.events.Receiver(connection, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> "EventCapture":
        self.thread.start()
        # Subscribed once a worker's heartbeat (every 2 s) arrives.
        wait_for(lambda: any(e.get("type") == "worker-heartbeat" for e in self.events), timeout=30, what="events")
        return self

    def __exit__(self, *_: object) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=10)

    def text(self) -> str:
        return json.dumps(self.events, default=str)


def without_failure_seal(row: dict) -> bool:
    """Take the failure seal out of a stored result row's arguments, after checking it is
    the seal of exactly that failure; whether there was one."""
    try:
        args = json.loads(row["task_args"] or "null")
        args = json.loads(args) if isinstance(args, str) else args
        saga_id, sealed = args[0]["saga_id"], args[0].pop(FAILURE_SEAL_FIELD)
    except (ValueError, TypeError, KeyError, IndexError):
        return False
    error_type = json.loads(row["result"])["exc_type"]
    step = step_name_of(row["task_id"], saga_id) or ""
    assert failure_seal_valid(sealed, saga_id=saga_id, step=step, task_id=row["task_id"], error_type=error_type)
    row["task_args"] = json.dumps(json.dumps(args))
    return True


def test_nothing_personal_or_reusable_leaves_a_step(api: Api, topology: Topology, sku: str) -> None:
    """Logs, task events (Flower) and stored results carry ids and outcomes only."""
    make_product(sku, on_hand=5)
    email = f"leak-{uuid.uuid4().hex[:12]}@example.com"
    phone = f"+1555{uuid.uuid4().int % 10**7:07d}"
    started = timezone.now()
    offsets = {name: p.log_path.stat().st_size for name, p in topology.processes.items() if p.log_path.exists()}

    with EventCapture() as events:
        placed = [
            api.place_order([(sku, 1)], email=email, phone=phone),
            api.place_order([(sku, 1)], token="tok_chargeDeclined", email=email, phone=phone),
        ]
        sagas = [finished_saga(api, placed[0]["id"], "completed"), finished_saga(api, placed[1]["id"], "compensated")]
        ids = [str(s.id) for s in sagas]
        # The last step of each saga has told Flower it succeeded.
        wait_for(
            lambda: all(
                any(
                    e.get("type") == "task-succeeded" and str(e.get("uuid", "")).startswith(f"{i}-notify")
                    for e in events.events
                )
                for i in ids
            ),
            timeout=30,
            what="the notify steps' task-succeeded events",
        )

    secrets = {
        "email": email,
        "phone": phone,
        "payment token": "tok_",
        "signature or authority": "eyJzYWdh",  # base64 of '{"saga': common.signing's tokens
        "seal": "_seal",
        "old signature": "saga_signature",
    }
    logs = {}
    for name, process in topology.processes.items():
        with open(process.log_path, "rb") as log:
            log.seek(offsets.get(name, 0))
            logs[name] = log.read().decode(errors="replace")
    rows = list(
        TaskResult.objects.filter(date_done__gte=started).values(
            "task_id", "task_name", "task_args", "task_kwargs", "result", "traceback", "meta"
        )
    )
    # A failed step's stored arguments carry its seal over the failure's type
    # (common.signing.failure_seal). Bound to that task's saga, step, id and error type, it
    # authorises nothing and fits no other failure: checked, then left out of the scan.
    attested = [row["task_id"] for row in rows if without_failure_seal(row)]
    assert f"{ids[1]}-charge_payment-g0" in attested  # the declined charge's
    stored = json.dumps(rows, default=str)
    # Not vacuous: the steps did log, report and store something about these sagas.
    assert all(i in "".join(logs.values()) for i in ids)
    assert all(f"{i}-charge_payment" in events.text() for i in ids)
    assert f"{ids[1]}-charge_payment" in stored  # the declined charge's failure
    for what, secret in secrets.items():
        for name, text in logs.items():
            assert secret not in text, f"{what} in the {name} log: {text[text.index(secret) - 300 :][:600]}"
        assert secret not in events.text(), f"{what} in a task event"
        assert secret not in stored, f"{what} in a stored task result"
    # The declined charge's stored arguments still give the coordinator the chain's timing.
    row = TaskResult.objects.get(task_id=f"{ids[1]}-charge_payment-g0")
    [args] = json.loads(json.loads(row.task_args))
    assert args["saga_id"] == ids[1] and [m["task_id"] for m in args["_steps"]] == [f"{ids[1]}-reserve_inventory-g0"]


def test_a_worker_shows_a_step_it_holds_by_its_ids_only(api: Api, sku: str) -> None:
    """What `celery inspect` and Flower's worker pages (reserved and scheduled tasks, every
    task in its API) get from a worker about a step it holds: Celery's own answer was the
    step's arguments, the customer's email, phone and card token and the step's authority
    (common.worker_control)."""
    import socket

    make_product(sku, on_hand=5)
    email = f"held-{uuid.uuid4().hex[:12]}@example.com"
    phone = f"+1555{uuid.uuid4().int % 10**7:07d}"
    # The charge holds a payments process for FAKE_PROVIDER_SLOW_SECONDS.
    placed = api.place_order([(sku, 1)], token="tok_slow", email=email, phone=phone)
    task_id = f"{placed['saga']['id']}-charge_payment-g0"
    inspect = app.control.inspect(destination=[f"payments@{socket.gethostname()}"], timeout=1.0)

    def held() -> dict | None:
        active = inspect.active() or {}
        if not any(t["id"] == task_id for tasks in active.values() for t in tasks):
            return None
        return {
            "active": active,
            "query_task": inspect.query_task(task_id) or {},
            "reserved": inspect.reserved() or {},
            "scheduled": inspect.scheduled() or {},
        }

    answers = wait_for(held, timeout=30, what="the payments worker to run the slow charge")
    text = json.dumps(answers, default=str)
    for what, secret in {"email": email, "phone": phone, "card token": "tok_", "authority": "eyJzYWdh"}.items():
        assert secret not in text, f"{what} in what the worker shows: {text[max(0, text.index(secret) - 200) :][:400]}"
    assert f"<saga {placed['saga']['id']} context>" in text  # not vacuous: its reprs are shown
    assert task_id in json.dumps(answers["query_task"])
    api.wait_until_final(placed["id"])


def test_a_step_message_on_a_queue_whose_worker_cannot_run_it_is_logged_by_its_ids_only(topology: Topology) -> None:
    """A step's message where its task is not registered (Flower lets a login add another
    service's queue to a worker; a deploy can do it by mistake): Celery logs the body's
    first 1,024 characters, the customer's email and card token and the step's authority
    (common.worker_control)."""
    saga_id = uuid.uuid4()
    email = f"misrouted-{uuid.uuid4().hex[:12]}@example.com"
    ctx = {
        "saga_id": str(saga_id),
        "order_id": str(uuid.uuid4()),
        "email": email,
        "payment_token": "tok_visa",
        "items": [{"sku": "MUG-LOGO", "quantity": 1, "unit_price": "12.00"}],
    }
    log = topology.processes["notifications"].log_path
    offset = log.stat().st_size
    chain = build_chain(PLACE_ORDER.steps[:1], saga_id=saga_id, generation=0, phase="forward", context=ctx)
    chain.apply_async(queue="notifications")
    task_id = f"{saga_id}-reserve_inventory-g0"

    def logged() -> str | None:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return text if "Received unregistered task of type 'inventory.reserve'" in text and task_id in text else None

    text = wait_for(logged, timeout=30, what="the notifications worker to log the message it cannot run")
    for what, secret in {"email": email, "card token": "tok_", "authority": "eyJzYWdh"}.items():
        assert secret not in text, f"{what} in the log: {text[max(0, text.index(secret) - 200) :][:400]}"
    assert f"<saga {saga_id} context>" in text  # its ids, still
