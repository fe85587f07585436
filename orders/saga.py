"""The place-order saga: reserve -> charge -> confirm (pivot) -> notify; then, in a
batch with other confirmed orders, the reservation becomes a sale (the settlement).

Compensations sit next to the actions they undo. After compensating, the order is
marked failed (or cancelled) and the customer is told.

The engine calls back into orders only through what the definition hands it here: the
pivot guard (`order_lock_for_compensation`, below) and the customer's sentence for a
failure (orders.failure_text.customer_reason). It never imports orders.

Definitions here are only declared: a deployment runs those SAGA_DEFINITIONS names (the
default: version 1, PLACE_ORDER), which saga.definition.definitions_load registers.
Version 2 is a change made the safe way (docs/OPERATIONS.md, "Changing a saga"): a new version beside
the old one, never an edit of it.
"""

from dataclasses import replace

from django.conf import settings

from saga.definition import SagaDefinition, Step
from saga.models import SagaInstance

from .failure_text import customer_reason
from .models import Order


def order_lock_for_compensation(*, saga: SagaInstance) -> str | None:
    """The place-order saga's pivot guard (saga.definition.SagaDefinition.pivot_guard).

    Locks the order row, as `order_confirm` and `order_cancel` (orders.services) do before
    they read the saga, and says why the saga can no longer be compensated, or None while
    the order is pending: a confirm that has not committed yet then finds the saga
    compensating and refuses. Precondition: inside `transaction.atomic(using="orders")`,
    before the saga row is locked.
    """
    order = Order.objects.select_for_update().filter(id=saga.order_id).first()
    if order is None:
        return f"its order {saga.order_id} does not exist"
    if order.status == Order.Status.CONFIRMED:
        return "its order is confirmed: the pivot committed and nothing before it can be undone"
    if order.status != Order.Status.PENDING:
        return f"its order is already {order.status}"
    if order.cancel_requested_at:
        return "its order is already being cancelled"
    return None


# The provider may be slow (tok_slow): the charge's deadline allows for it.
_CHARGE_TIMEOUT = settings.SAGA_STEP_TIMEOUT + int(settings.FAKE_PROVIDER_SLOW_SECONDS)
PLACE_ORDER = SagaDefinition(
    name="place_order",
    version=1,
    steps=(
        Step(
            "reserve_inventory",
            "inventory.reserve",
            compensation=Step("release_inventory", "inventory.release"),
        ),
        Step(
            "charge_payment",
            "payments.charge",
            compensation=Step("refund_payment", "payments.refund"),
            timeout=_CHARGE_TIMEOUT,
            # A decline is recorded under the charge's key before it is raised, and the
            # provider's decline is final for that key: no refund to run after one.
            final_failures=("PaymentDeclined",),
        ),
        Step("confirm_order", "orders.confirm"),
        Step("notify_customer", "notifications.notify"),
    ),
    pivot="confirm_order",
    # The order's row lock, which orders.confirm also takes (an operator's "compensate now").
    pivot_guard=order_lock_for_compensation,
    # What the customer is told (the order's failure_reason, the email), by failure kind.
    customer_reason=customer_reason,
    after_compensation=(
        Step("fail_order", "orders.fail"),
        Step("notify_failure", "notifications.notify"),
    ),
    # Once confirmed, the order's reservation becomes a sale: sent by the coordinator's
    # sweep for a batch of confirmed orders at once, not as a fifth step (saga.settlement).
    settlement=Step("record_sales", "inventory.record_sales"),
)

# Version 2 adds a first step, a read-only stock and price check that fails an order
# before anything is held or locked (inventory.check_stock), and renames charge_payment
# to capture_payment. Sagas that started on version 1 finish on version 1.
PLACE_ORDER_V2 = replace(
    PLACE_ORDER,
    version=2,
    steps=(
        Step("check_stock", "inventory.check_stock"),
        PLACE_ORDER.steps[0],
        replace(PLACE_ORDER.steps[1], name="capture_payment"),
        *PLACE_ORDER.steps[2:],
    ),
)
