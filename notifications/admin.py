from django.contrib import admin

from common.admin_mixins import ReadOnlyAdminMixin

from .models import Notification, ProcessedKey


@admin.register(Notification)
class NotificationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["order_id", "kind", "channel", "recipient", "subject", "status", "created_at", "sent_at"]
    list_filter = ["kind", "channel", "status", "created_at"]
    search_fields = ["=order_id", "=saga_id", "recipient"]
    date_hierarchy = "created_at"


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]
