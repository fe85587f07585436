from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from saga.models import SagaStatus, StepPhase, StepStatus

from ..failure_text import customer_reason, error_kind
from ..models import Order

# Stripe-style token: what a card form hands the server instead of card numbers.
TOKEN_PATTERN = r"^tok_[A-Za-z0-9_]{1,60}$"
PHONE_PATTERN = r"^\+[1-9][0-9]{6,14}$"


class OrderItemInput(serializers.Serializer):
    sku = serializers.CharField(max_length=64)
    quantity = serializers.IntegerField(min_value=1, max_value=settings.ORDER_MAX_QUANTITY)


class OrderCreateInput(serializers.Serializer):
    email = serializers.EmailField(max_length=254)
    phone = serializers.RegexField(
        PHONE_PATTERN,
        required=False,
        allow_blank=True,
        default="",
        error_messages={"invalid": "Enter a phone number in E.164 form, e.g. +14155550123."},
    )
    items = serializers.ListField(
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


class OrderLineOutput(serializers.Serializer):
    sku = serializers.CharField()
    name = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=10, decimal_places=2)


class SagaStepOutput(serializers.Serializer):
    name = serializers.CharField()
    phase = serializers.ChoiceField(choices=StepPhase.choices)
    status = serializers.ChoiceField(choices=StepStatus.choices)
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
    current_step = serializers.CharField(allow_blank=True)
    failure_step = serializers.CharField(allow_blank=True)
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
