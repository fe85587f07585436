from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from common.api import order_filter

from ..selectors import payment_list


class PaymentOutput(serializers.Serializer):
    id = serializers.UUIDField()
    order_id = serializers.UUIDField()
    saga_id = serializers.UUIDField()
    amount = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    status = serializers.CharField()
    decline_code = serializers.CharField()
    provider_charge_id = serializers.CharField()
    refunded_amount = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_refunded_amount(self, payment) -> str | None:
        refund = getattr(payment, "refund", None)
        return None if refund is None else str(refund.amount)


class PaymentListApi(GenericAPIView):
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(payment_list(order_id=order_filter(request)))
        return self.get_paginated_response(PaymentOutput(page, many=True).data)
