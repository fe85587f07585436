"""Links between the admin pages of one order's records, which live in different services."""

import uuid

from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString


def order_payments_link(order_id: uuid.UUID, label: str) -> SafeString:
    url = reverse("admin:payments_payment_changelist")
    return format_html('<a href="{}?order_id={}">{}</a>', url, order_id, label)


def order_notifications_link(order_id: uuid.UUID, label: str) -> SafeString:
    url = reverse("admin:notifications_notification_changelist")
    return format_html('<a href="{}?order_id={}">{}</a>', url, order_id, label)
