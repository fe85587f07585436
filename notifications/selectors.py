import uuid

from django.db.models import QuerySet

from .models import Notification


def notification_list(*, order_id: uuid.UUID | None) -> QuerySet[Notification]:
    notifications = Notification.objects.order_by("created_at", "channel")
    return notifications if order_id is None else notifications.filter(order_id=order_id)
