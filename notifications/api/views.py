from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from common.api import ORDER_FILTER, error_responses, order_filter

from ..models import Notification
from ..selectors import notification_list

# Needed to read other customers' records (docs/SECURITY.md).
VIEW_NOTIFICATIONS = "notifications.view_notification"


class NotificationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    order_id = serializers.UUIDField()
    kind = serializers.ChoiceField(choices=Notification.Kind.choices)
    channel = serializers.ChoiceField(choices=Notification.Channel.choices)
    recipient = serializers.CharField()
    subject = serializers.CharField()
    status = serializers.ChoiceField(choices=Notification.Status.choices)
    created_at = serializers.DateTimeField()
    sent_at = serializers.DateTimeField(allow_null=True)


class NotificationListApi(GenericAPIView):
    serializer_class = NotificationOutput

    @extend_schema(
        operation_id="notifications_list",
        summary="What the notifications service sent about an order",
        parameters=[ORDER_FILTER],
        responses={200: NotificationOutput(many=True), **error_responses(400, 401, 404)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(notification_list(order_id=order_filter(request, permission=VIEW_NOTIFICATIONS)))
        return self.get_paginated_response(NotificationOutput(page, many=True).data)
