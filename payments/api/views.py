from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from common.api import ORDER_FILTER, error_responses, order_filter

from ..models import Payment
from ..selectors import payment_list

# Needed to read other customers' records (docs/SECURITY.md).
VIEW_PAYMENTS = "payments.view_payment"


class PaymentOutput(serializers.Serializer):
    id = serializers.UUIDField()
    order_id = serializers.UUIDField()
    saga_id = serializers.UUIDField()
    amount = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    status = serializers.ChoiceField(choices=Payment.Status.choices)
    decline_code = serializers.CharField(allow_blank=True)
    provider_charge_id = serializers.CharField(allow_blank=True)
    refunded_amount = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_refunded_amount(self, payment) -> str | None:
        refund = getattr(payment, "refund", None)
        return None if refund is None else str(refund.amount)


class PaymentListApi(GenericAPIView):
    serializer_class = PaymentOutput

    @extend_schema(
        operation_id="payments_list",
        summary="What the payments service recorded for an order",
        parameters=[ORDER_FILTER],
        responses={200: PaymentOutput(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(payment_list(order_id=order_filter(request, permission=VIEW_PAYMENTS)))
        return self.get_paginated_response(PaymentOutput(page, many=True).data)
