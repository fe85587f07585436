import re
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from saga.models import SagaStatus, StepPhase

from ..failure_text import customer_reason, error_kind
from ..models import Order
from .render import STEP_STATUSES, step_status

# Stripe-style token: what a card form hands the server instead of card numbers.
TOKEN_PATTERN = r"^tok_[A-Za-z0-9_]{1,60}$"
PHONE_PATTERN = r"^\+[1-9][0-9]{6,14}$"


class OrderItemInput(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    quantity = serializers.IntegerField(min_value=1, max_value=settings.ORDER_MAX_QUANTITY)


class BoundedListField(serializers.ListField):
    """A ListField that refuses a list longer than `max_length` before it validates a line:
    REST framework checks the length after every child, so 30,000 bad lines in a 64 KiB
    body cost a second of CPU and answered 2.8 MB of errors, limit or not."""

    def to_internal_value(self, data: Any) -> Any:
        if self.max_length is not None and isinstance(data, list) and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().to_internal_value(data)


class OrderCreateInput(serializers.Serializer):
    email = serializers.EmailField(max_length=254)
    phone = serializers.RegexField(
        PHONE_PATTERN,
        required=False,
        allow_blank=True,
        default="",
        error_messages={"invalid": "Enter a phone number in E.164 form, e.g. +14155550123."},
    )
    items = BoundedListField(
        child=OrderItemInput(), allow_empty=False, min_length=1, max_length=settings.ORDER_MAX_LINES
    )
    payment_token = serializers.RegexField(
        TOKEN_PATTERN, max_length=64, error_messages={"invalid": "Enter a payment token such as tok_visa."}
    )

    def validate_items(self, items: list[dict]) -> list[dict]:
        skus = [item["sku"] for item in items]
        duplicates = sorted({sku for sku in skus if skus.count(sku) > 1})
        if duplicates:
            raise serializers.ValidationError(f"Each SKU may appear once; repeated: {', '.join(duplicates)}.")
        return items


_ORDER_FIELDS = frozenset(("email", "phone", "items", "payment_token"))
_REQUIRED = frozenset(("email", "items", "payment_token"))
_ITEM_FIELDS = frozenset(("sku", "quantity"))
_TOKEN = re.compile(TOKEN_PATTERN)
_PHONE = re.compile(PHONE_PATTERN)
# What DRF's CharField refuses in any string (ProhibitNull/SurrogateCharactersValidator).
_REFUSED_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


def _plain(value: Any, max_length: int | None = None) -> bool:
    """A string `CharField` would keep as it is: not blank, nothing to trim, within length."""
    return (
        type(value) is str
        and 0 < len(value) <= (max_length or len(value))
        and value == value.strip()
        and not _REFUSED_CHARACTERS.search(value)
    )


def order_input_as_given(data: Any) -> dict[str, Any] | None:
    """`OrderCreateInput(data=data).validated_data` for a body that is valid and already in
    the form the serializer gives back (nothing to trim or convert, no field it ignores);
    None for any other body, valid or not: the serializer then decides, and words the errors.

    The hot path of `POST /api/orders/` (orders.api.views): most orders come as their
    clients wrote them, and building the serializer's fields is most of what validating
    one costs. orders/tests/test_order_input.py checks, over generated bodies, that this
    never accepts what the serializer refuses and never gives back anything else.
    """
    if type(data) is not dict or not data.keys() <= _ORDER_FIELDS or not _REQUIRED <= data.keys():
        return None
    email, phone, items, token = data["email"], data.get("phone", ""), data["items"], data["payment_token"]
    if not _plain(email, 254) or not _plain(token, 64) or not _TOKEN.search(token):
        return None
    if phone != "" and not (_plain(phone) and _PHONE.search(phone)):
        return None
    if type(items) is not list or not 0 < len(items) <= settings.ORDER_MAX_LINES:
        return None
    lines, skus = [], set()
    for item in items:
        if type(item) is not dict or item.keys() != _ITEM_FIELDS:
            return None
        sku, quantity = item["sku"], item["quantity"]
        if not _plain(sku, 64) or sku in skus:
            return None
        if type(quantity) is not int or not 1 <= quantity <= settings.ORDER_MAX_QUANTITY:
            return None
        skus.add(sku)
        lines.append({"sku": sku, "quantity": quantity})
    try:
        validate_email(email)
    except DjangoValidationError:
        return None
    return {"email": email, "phone": phone, "items": lines, "payment_token": token}


class OrderLineOutput(serializers.Serializer):
    sku = serializers.CharField()
    name = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=10, decimal_places=2)


class StepStatusField(serializers.ChoiceField):
    """A step's status, read from the whole step (it depends on its saga's)."""

    def to_representation(self, step: Any) -> str:
        return step_status(step, step.saga)


class SagaStepOutput(serializers.Serializer):
    name = serializers.CharField()
    phase = serializers.ChoiceField(choices=StepPhase.choices)
    status = StepStatusField(
        choices=STEP_STATUSES,
        source="*",
        help_text="`running`: the saga's chain is in flight from this step: it, or a later step of the same "
        "phase (forward: up to the pivot, `confirm_order`), is running or queued; the saga hears of each step "
        "when the chain reaches the pivot or its end, not one message per step. "
        "`not_run`: the step has not run and will not unless an operator retries the saga (a forward "
        "step after the one whose failure or cancel made the saga compensate, or any step left of a saga that "
        "waits for an operator). `unknown`: the saga compensated while its chain may have been at this step, "
        "and no report has said yet whether it committed.",
    )
    attempts = serializers.IntegerField()
    queued_at = serializers.DateTimeField(allow_null=True)
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.SerializerMethodField(
        help_text="The kind of the step's last error (e.g. PaymentDeclined; InternalError for any kind "
        "customers are not told about). Its full text is for operators, in the admin."
    )
    celery_task_id = serializers.CharField(allow_blank=True)

    def get_last_error(self, step) -> str:
        return error_kind(step.last_error)


class SagaOutput(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=SagaStatus.choices)
    current_step = serializers.CharField(
        allow_blank=True,
        help_text="The step the saga last knew its chain to be at: while it runs, that step or a later one "
        "before the pivot (see a step's `running`); empty once it ended.",
    )
    failure_step = serializers.CharField(
        allow_blank=True,
        help_text="The step whose failure made the saga compensate or stop. For a cancel, the step the saga "
        "knew its chain to be at when the cancel came; the steps say where the chain stopped (`refused`).",
    )
    failure_reason = serializers.SerializerMethodField(
        help_text="Why the saga stopped, in the customer's words (the error itself is in the admin)."
    )
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    steps = SagaStepOutput(many=True, source="steps.all")

    def get_failure_reason(self, saga) -> str:
        return customer_reason(saga.failure_type) if saga.failure_type else ""


class OrderOutput(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.ChoiceField(choices=Order.Status.choices)
    email = serializers.EmailField()
    phone = serializers.CharField(allow_blank=True)
    items = OrderLineOutput(many=True, source="lines.all")
    total = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    failure_reason = serializers.CharField(allow_blank=True)
    cancel_requested = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    saga = serializers.SerializerMethodField()

    def get_cancel_requested(self, order) -> bool:
        return order.cancel_requested_at is not None

    @extend_schema_field(SagaOutput(allow_null=True))
    def get_saga(self, order) -> dict | None:
        saga = self.context.get("sagas", {}).get(order.id)
        return None if saga is None else SagaOutput(saga).data
