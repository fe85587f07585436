from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from common.api import order_filter

from ..selectors import notification_list


class NotificationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    order_id = serializers.UUIDField()
    kind = serializers.CharField()
    channel = serializers.CharField()
    recipient = serializers.CharField()
    subject = serializers.CharField()
    status = serializers.CharField()
    created_at = serializers.DateTimeField()
    sent_at = serializers.DateTimeField()


class NotificationListApi(GenericAPIView):
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(notification_list(order_id=order_filter(request)))
        return self.get_paginated_response(NotificationOutput(page, many=True).data)
