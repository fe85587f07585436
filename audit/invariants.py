"""Cross-database invariants of the order saga, checked from the outside.

Reads every service's database and returns one line per violation. `python manage.py
saga_audit` prints them and exits non-zero. This is an operator's tool, not a service: it
is the one package allowed to import every service's models, which is why it lives here
and not in the coordinator (`saga`), whose boundaries the import contracts check
(pyproject.toml, [tool.importlinter]).
"""

import itertools
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, Q, Sum
from django.utils import timezone

from audit.deliveries import Delivery
from inventory.models import Product, Reservation
from notifications.models import Notification, message_reference
from orders.models import Order, OrderLine
from payments.models import FakeProviderOperation, Payment, Refund
from saga.definition import registered_definitions
from saga.models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus

# Keyed by the status strings the rows hold.
FINAL_ORDER: set[str] = {Order.Status.CONFIRMED, Order.Status.FAILED, Order.Status.CANCELLED}
OUTCOME_KIND: dict[str, str] = {
    Order.Status.CONFIRMED: Notification.Kind.ORDER_CONFIRMED,
    Order.Status.FAILED: Notification.Kind.ORDER_FAILED,
    Order.Status.CANCELLED: Notification.Kind.ORDER_CANCELLED,
}
SAGA_FOR_ORDER: dict[str, set[str]] = {
    Order.Status.CONFIRMED: {SagaStatus.COMPLETED},
    Order.Status.FAILED: {SagaStatus.COMPENSATED},
    Order.Status.CANCELLED: {SagaStatus.COMPENSATED},
}


def audit(
    *,
    grace: timedelta = timedelta(minutes=5),
    now: datetime | None = None,
    initial_stock: Mapping[str, int] | None = None,
    deliveries: Sequence[Delivery] | None = None,
    resend_excused: Callable[[float, float], bool] = lambda first, again: False,
) -> list[str]:
    """Every violation found now, one line each. `grace`: how long an order may still be
    pending, and a confirmed one's sale unsettled. `initial_stock` (SKU -> units on hand at
    the start, with no adjustment since): checks that each of those SKUs' on hand plus
    what was sold is still that (stock conservation), as the chaos run does.

    `deliveries` (audit.deliveries: every message the customers were sent, when the file
    backends sent them all): checks each final order got exactly one message of its
    outcome on each channel it gave, at its own address, and no other. A message delivered
    twice is a violation unless `resend_excused(first, again)` (their times) says why: the
    chaos run excuses a re-send after a kill of the sender between the two, the one
    window SMTP leaves (notifications.services)."""
    now = now or timezone.now()
    violations: list[str] = []
    orders = {o.id: o for o in Order.objects.only("id", "status", "created_at", "email", "phone", "total", "currency")}
    sagas = {
        s.order_id: s
        for s in SagaInstance.objects.only(
            "id", "order_id", "status", "definition", "definition_version", "pivot_committed_at", "settled_at"
        )
    }

    # 1. Every order ends confirmed, failed or cancelled, unless still inside its grace period.
    for order in orders.values():
        saga = sagas.get(order.id)
        if saga is None:
            violations.append(f"order {order.id}: has no saga")
            continue
        if order.status not in FINAL_ORDER:
            if order.created_at < now - grace:
                violations.append(f"order {order.id}: still {order.status} after {grace} (saga {saga.status})")
            continue
        if saga.status not in SAGA_FOR_ORDER[order.status]:
            violations.append(f"order {order.id}: is {order.status} but its saga is {saga.status}")

    # 2. Stock: reserved is exactly what held reservations hold; held ones belong to orders
    # in flight; a confirmed order's reservation is sold once its saga is settled (and only
    # then), an unconfirmed order's never; with the initial stock known, on hand plus sold
    # is still that.
    held, sold = (
        dict(
            Reservation.objects.filter(status=status)
            .values_list("sku")
            .annotate(total=Sum("quantity"))
            .values_list("sku", "total")
        )
        for status in (Reservation.Status.HELD, Reservation.Status.SOLD)
    )
    for product in Product.objects.all():
        if product.reserved != held.get(product.sku, 0):
            violations.append(
                f"product {product.sku}: reserved={product.reserved} but held reservations add up to "
                f"{held.get(product.sku, 0)}"
            )
        if product.reserved > product.on_hand:
            violations.append(f"product {product.sku}: available is negative ({product.on_hand - product.reserved})")
        if initial_stock is not None and product.sku in initial_stock:
            if product.on_hand + sold.get(product.sku, 0) != initial_stock[product.sku]:
                violations.append(
                    f"product {product.sku}: on_hand={product.on_hand} plus {sold.get(product.sku, 0)} sold is not "
                    f"the {initial_stock[product.sku]} it started with"
                )
    for reservation in Reservation.objects.all():
        owner = orders.get(reservation.order_id)
        status = owner.status if owner else None
        owner_saga = sagas.get(reservation.order_id)
        settled = owner_saga is not None and owner_saga.settled_at is not None
        if reservation.status == Reservation.Status.HELD and status in (Order.Status.FAILED, Order.Status.CANCELLED):
            violations.append(f"order {reservation.order_id}: is {status} but still holds {reservation.sku}")
        if reservation.status == Reservation.Status.RELEASED and status == Order.Status.CONFIRMED:
            violations.append(f"order {reservation.order_id}: is confirmed but its {reservation.sku} was released")
        if reservation.status == Reservation.Status.SOLD and status != Order.Status.CONFIRMED:
            violations.append(f"order {reservation.order_id}: is {status} but its {reservation.sku} was sold")
        if reservation.status != Reservation.Status.SOLD and status == Order.Status.CONFIRMED and settled:
            violations.append(
                f"order {reservation.order_id}: is confirmed and settled but its {reservation.sku} is "
                f"{reservation.status}, not sold"
            )
    # What a definition settles after its pivot (saga.settlement); one without settles nothing.
    settling = {(d.name, d.version) for d in registered_definitions() if d.settlement is not None}
    for saga in sagas.values():
        if (saga.definition, saga.definition_version) not in settling or saga.settled_at is not None:
            continue
        if saga.pivot_committed_at is not None and saga.pivot_committed_at < now - grace:
            violations.append(f"saga {saga.id}: confirmed at {saga.pivot_committed_at} but its sale is not settled")

    # 3. Money, from the provider's ledger (what moved), each charge tied to its order and
    # each refund to the charge it refunded: a confirmed order's one charge is its quoted
    # total and kept; any other final order's charges are refunded in full.
    charges: dict[str, list[FakeProviderOperation]] = defaultdict(list)  # saga id -> succeeded charges
    refunds: dict[str, list[FakeProviderOperation]] = defaultdict(list)  # charge reference -> refunds
    for op in FakeProviderOperation.objects.filter(outcome="succeeded"):
        if op.kind == "charge":
            charges[op.idempotency_key.split(":", 1)[0]].append(op)
        elif op.kind == "refund":
            refunds[op.charge_reference].append(op)
    charged_at: dict[uuid.UUID, FakeProviderOperation] = {}  # a confirmed order -> its charge
    references = {op.reference for ops in charges.values() for op in ops}
    for reference in refunds.keys() - references:
        violations.append(f"the provider refunded {reference!r}, which is no charge of a saga")
    saga_by_id = {str(saga.id): saga for saga in sagas.values()}
    for saga_id, ops in charges.items():
        if len(ops) > 1:
            violations.append(f"saga {saga_id}: the provider charged it {len(ops)} times")
        charged_saga = saga_by_id.get(saga_id)
        payer = orders.get(charged_saga.order_id) if charged_saga is not None else None
        if payer is None:
            violations.append(f"saga {saga_id}: the provider charged it, and it has no order")
            continue
        if payer.status not in FINAL_ORDER:
            continue
        for op in ops:
            back = refunds.get(op.reference, [])
            if len(back) > 1:
                violations.append(f"order {payer.id}: the provider refunded its charge {len(back)} times")
            kept = op.amount - sum((refund.amount for refund in back), Decimal("0"))
            if any(refund.currency != op.currency for refund in back):
                violations.append(f"order {payer.id}: its charge in {op.currency} was refunded in another currency")
            if payer.status == Order.Status.CONFIRMED:
                if op.amount != payer.total or op.currency != payer.currency:
                    violations.append(
                        f"order {payer.id}: confirmed at {payer.total} {payer.currency} but charged "
                        f"{op.amount} {op.currency}"
                    )
                charged_at[payer.id] = op
                if back:
                    violations.append(f"order {payer.id}: confirmed but its charge was refunded")
            elif kept != 0:
                violations.append(f"order {payer.id}: {payer.status} but the provider kept {kept} of its money")
    for order in orders.values():
        paid_saga = sagas.get(order.id)
        if order.status == Order.Status.CONFIRMED and (paid_saga is None or str(paid_saga.id) not in charges):
            violations.append(f"order {order.id}: confirmed but the provider has no charge for it")
    # Our own records agree with the ledger.
    refunded = set(Refund.objects.values_list("payment_id", flat=True))
    for row in Payment.objects.values("order_id").annotate(n=Count("id")).filter(n__gt=1):
        violations.append(f"order {row['order_id']}: has {row['n']} payments")
    for payment in Payment.objects.all():
        payer = orders.get(payment.order_id)
        status = payer.status if payer else None
        if status not in FINAL_ORDER:
            continue
        if status == Order.Status.CONFIRMED:
            if payment.status != Payment.Status.CAPTURED:
                violations.append(f"order {payment.order_id}: confirmed but its payment is {payment.status}")
            charge = charged_at.get(payment.order_id)
            ours = (payment.amount, payment.currency, payment.provider_charge_id)
            if charge is not None and ours != (charge.amount, charge.currency, charge.reference):
                violations.append(
                    f"order {payment.order_id}: its payment says {payment.amount} {payment.currency} charged as "
                    f"{payment.provider_charge_id!r}, the provider {charge.amount} {charge.currency} as "
                    f"{charge.reference!r}"
                )
        else:
            if payment.status in (Payment.Status.CAPTURED, Payment.Status.REFUNDING, Payment.Status.PENDING):
                violations.append(f"order {payment.order_id}: {status} but its payment is {payment.status}")
            if payment.status == Payment.Status.REFUNDED and payment.pk not in refunded:
                violations.append(f"order {payment.order_id}: payment refunded without a refund record")
    paid_orders = set(Payment.objects.values_list("order_id", flat=True))
    for order in orders.values():
        if order.status == Order.Status.CONFIRMED and order.id not in paid_orders:
            violations.append(f"order {order.id}: confirmed without a payment")

    # 4. One notification of its outcome per terminal order on each channel it gave (an email;
    # an SMS with a phone), delivered (sent), and no other.
    sent: dict[object, Counter] = defaultdict(Counter)
    told: dict[object, set[str]] = defaultdict(set)
    for order_id, kind, channel, status in Notification.objects.values_list("order_id", "kind", "channel", "status"):
        told[order_id].add(kind)
        if status == Notification.Status.SENT:
            sent[order_id][(kind, channel)] += 1
    for order in orders.values():
        if order.status not in FINAL_ORDER:
            continue
        delivered = sent.get(order.id, Counter())
        expected = OUTCOME_KIND[order.status]
        channels = [Notification.Channel.EMAIL] + ([Notification.Channel.SMS] if order.phone else [])
        for channel in channels:
            if delivered[(expected, channel)] != 1:
                violations.append(
                    f"order {order.id}: {delivered[(expected, channel)]} {expected} {channel} sent, not 1"
                )
        other = told.get(order.id, set()) - {expected}
        if other:
            violations.append(f"order {order.id}: {order.status} but was also told {sorted(other)}")

    # 5. The saga's step log agrees with what the participants recorded.
    reserved_orders = set(Reservation.objects.values_list("order_id", flat=True))
    captured_sagas = set(charges)
    by_id = {saga.id: saga for saga in sagas.values()}
    # By task, not step name: a definition version may rename a step (saga.definition).
    succeeded = SagaStep.objects.filter(
        status=StepStatus.SUCCEEDED, phase=StepPhase.FORWARD, task_name__in=["inventory.reserve", "payments.charge"]
    )
    for step in succeeded:
        saga = by_id.get(step.saga_id)
        if saga is None:
            continue
        if step.task_name == "inventory.reserve" and saga.order_id not in reserved_orders:
            violations.append(f"saga {saga.id}: log says stock was reserved, inventory has no reservation")
        if step.task_name == "payments.charge" and str(saga.id) not in captured_sagas:
            violations.append(f"saga {saga.id}: log says it charged, the provider has no charge")
    # 6. The timeline tells the truth (issue 11): a step shown succeeded has its attempt and times.
    blind = SagaStep.objects.filter(status=StepStatus.SUCCEEDED).filter(
        Q(attempts=0) | Q(started_at__isnull=True) | Q(finished_at__isnull=True)
    )
    for blind_saga_id, name in blind.values_list("saga_id", "name"):
        violations.append(f"saga {blind_saga_id}: {name} is shown succeeded without its attempt and times")
    for saga in sagas.values():
        if saga.status == SagaStatus.NEEDS_ATTENTION:
            violations.append(f"saga {saga.id}: needs attention")
        if saga.status == SagaStatus.COMPLETED and saga.pivot_committed_at is None:
            violations.append(f"saga {saga.id}: completed without its pivot recorded")
    # 7. A finished saga's steps are settled: none still running; a completed saga's forward
    # steps succeeded (or, whose record was lost, unknown); a compensated saga's
    # compensations succeeded or were not needed.
    settled_steps: dict[str, tuple[str, set[str]]] = {
        SagaStatus.COMPLETED: (StepPhase.FORWARD, {StepStatus.SUCCEEDED, StepStatus.UNKNOWN}),
        SagaStatus.COMPENSATED: (StepPhase.COMPENSATION, {StepStatus.SUCCEEDED, StepStatus.NOT_NEEDED}),
    }
    finished_steps = SagaStep.objects.filter(saga__status__in=list(settled_steps)).values_list(
        "saga_id", "saga__status", "phase", "name", "status"
    )
    for step_saga_id, saga_status, phase, name, step_status in finished_steps:
        settled_phase, allowed = settled_steps[saga_status]
        if step_status == StepStatus.RUNNING or (phase == settled_phase and step_status not in allowed):
            violations.append(f"saga {step_saga_id}: {saga_status}, but its {name} is {step_status}")
    # 8. What was reserved is what was ordered: each reservation a line of its order, with
    # its quantity; a confirmed order holds or sold every line.
    order_lines = OrderLine.objects.only("order_id", "sku", "quantity", "unit_price")
    lines = {(line.order_id, line.sku): line.quantity for line in order_lines}
    # An order's total is what its lines add up to, as quoted (the charge is checked against it).
    quoted: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
    for line in order_lines:
        quoted[line.order_id] += line.quantity * line.unit_price
    for order_id, total in quoted.items():
        owner = orders.get(order_id)
        if owner is not None and owner.total != total:
            violations.append(f"order {order_id}: its total is {owner.total}, its lines add up to {total}")
    reserved_lines = set()
    for order_id, sku, quantity in Reservation.objects.values_list("order_id", "sku", "quantity"):
        reserved_lines.add((order_id, sku))
        if order_id not in orders:
            violations.append(f"a reservation of {sku} belongs to no order ({order_id})")
        elif lines.get((order_id, sku)) != quantity:
            ordered = lines.get((order_id, sku), 0)
            violations.append(f"order {order_id}: reserved {quantity} {sku}, but ordered {ordered}")
    for (order_id, sku), _ in lines.items():
        owner = orders.get(order_id)
        if owner is not None and owner.status == Order.Status.CONFIRMED and (order_id, sku) not in reserved_lines:
            violations.append(f"order {order_id}: confirmed without a reservation of its {sku}")
    # 9. (With the deliveries.) Check 4 again from the customers' side: what they were sent.
    if deliveries is not None:
        violations += _delivery_violations(orders, sagas, deliveries, resend_excused)
    return violations


def _delivery_violations(
    orders: Mapping[uuid.UUID, Order],
    sagas: Mapping[uuid.UUID, SagaInstance],
    deliveries: Sequence[Delivery],
    resend_excused: Callable[[float, float], bool],
) -> list[str]:
    """Check 9 of `audit`. The lines name orders and files, never an address."""
    violations: list[str] = []
    order_of_saga = {str(saga.id): order for saga in sagas.values() if (order := orders.get(saga.order_id))}
    copies: dict[tuple[str, str], list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        order = order_of_saga.get(delivery.saga_id)
        if order is None:
            violations.append(
                f"{delivery.where}: an {delivery.channel} whose reference {delivery.reference!r} is no saga's"
            )
            continue
        copies[(delivery.reference, delivery.channel)].append(delivery)
        expected = OUTCOME_KIND.get(order.status)
        if expected is None:
            violations.append(
                f"order {order.id}: still {order.status}, but was sent {delivery.kind} by {delivery.channel}"
            )
        elif delivery.kind != expected:
            violations.append(f"order {order.id}: {order.status}, but was sent {delivery.kind} by {delivery.channel}")
        address = order.email if delivery.channel == Notification.Channel.EMAIL else order.phone
        if delivery.to != address:
            violations.append(f"order {order.id}: its {delivery.kind} {delivery.channel} went to another address")
    for (_, channel), sent in copies.items():
        for first, again in itertools.pairwise(sent):
            if not resend_excused(first.at, again.at):
                violations.append(
                    f"order {order_of_saga[first.saga_id].id}: its {first.kind} {channel} was delivered again "
                    f"{again.at - first.at:.3f} s later ({first.where}, {again.where})"
                )
    for order in orders.values():
        expected = OUTCOME_KIND.get(order.status)
        if expected is None:
            continue
        saga = sagas.get(order.id)
        reference = message_reference(saga.id, expected) if saga is not None else ""
        for channel in [Notification.Channel.EMAIL] + ([Notification.Channel.SMS] if order.phone else []):
            if not copies.get((reference, channel)):
                violations.append(f"order {order.id}: {order.status}, and no {expected} {channel} was delivered")
    return violations
