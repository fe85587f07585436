"""What a customer is told when their order does not go through: one fixed sentence per
kind of failure (the saga's `failure_type`, the exception's class name).

The one place this text comes from. The coordinator picks it when it decides to
compensate (`SagaDefinition.customer_reason`, called by `saga_begin_compensation`), and it
travels in the compensation's context to `orders.fail` (the order's `failure_reason`) and
to the failure email. The exception's own text (which may name a host, a database role or
a query) stays in the saga store, for the admin; the API and the email never show it.
Each sentence completes "We could not complete your order ...: <reason>."
"""

CUSTOMER_REASONS = {
    "PaymentDeclined": "your payment was declined",
    "InsufficientStock": "there was not enough stock for an item you ordered",
    "UnknownProduct": "an item you ordered is no longer sold",
    "PriceChanged": "a price changed since you ordered; nothing was charged",
    "GatewayUnavailable": "our payment provider could not be reached",
    "StepTimedOut": "it took too long to process",
    "StepRefused": "it was stopped before it could be completed",
    "Cancelled": "you cancelled it",
    "CompensatedByOperator": "it was stopped by our staff",
}
# Kinds the API shows by their public parent: how the provider was unavailable (the circuit
# was open, it answered 503, it timed out) is the operator's concern (payments.resilience).
PUBLIC_KIND = {
    "CircuitOpen": "GatewayUnavailable",
    "ProviderError": "GatewayUnavailable",
    "ProviderTimedOut": "GatewayUnavailable",
}
# Anything else (a database error, a bug): nothing of it reaches the customer.
GENERIC_REASON = "something went wrong on our side"
# What the API shows as a step's error when its kind is not one of the above.
INTERNAL_ERROR = "InternalError"


def customer_reason(failure_type: str) -> str:
    """The customer's sentence for a failure of this kind (any kind: never raises)."""
    return CUSTOMER_REASONS.get(PUBLIC_KIND.get(failure_type, failure_type), GENERIC_REASON)


def error_kind(last_error: str) -> str:
    """A step's error as the API shows it: its kind ("PaymentDeclined"), never its text;
    a kind customers are not told about is "InternalError". `last_error` is stored as
    "<ExceptionType>: <message>" (SagaStep.mark_failed)."""
    if not last_error:
        return ""
    kind = last_error.partition(":")[0].strip()
    kind = PUBLIC_KIND.get(kind, kind)
    return kind if kind in CUSTOMER_REASONS else INTERNAL_ERROR
