"""The place-order saga: reserve -> charge -> confirm (pivot) -> notify.

Compensations sit next to the actions they undo. After compensating, the order is
marked failed (or cancelled) and the customer is told.
"""

from django.conf import settings

from saga.definition import SagaDefinition, Step, register

PLACE_ORDER = register(
    SagaDefinition(
        name="place_order",
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
                # The provider may be slow (tok_slow): allow for it.
                timeout=settings.SAGA_STEP_TIMEOUT + int(settings.FAKE_PROVIDER_SLOW_SECONDS),
            ),
            Step("confirm_order", "orders.confirm"),
            Step("notify_customer", "notifications.notify"),
        ),
        pivot="confirm_order",
        # The order's row lock, which orders.confirm also takes (an operator's "compensate now").
        pivot_guard="orders.services.order_lock_for_compensation",
        # What the customer is told (the order's failure_reason, the email), by failure kind.
        customer_reason="orders.failure_text.customer_reason",
        after_compensation=(
            Step("fail_order", "orders.fail"),
            Step("notify_failure", "notifications.notify"),
        ),
    )
)
