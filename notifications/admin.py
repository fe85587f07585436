from django.contrib import admin

from common.admin_mixins import DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin

from .models import Notification, ProcessedKey


@admin.register(Notification)
class NotificationAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    filter_lookups = ("order_id",)  # common.admin_links links here with ?order_id=
    list_display = ["order_id", "kind", "channel", "recipient", "subject", "status", "created_at", "sent_at"]
    list_filter = ["kind", "channel", "status", "created_at"]
    search_fields = ["=order_id", "=saga_id", "recipient"]
    date_hierarchy = "created_at"


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]
