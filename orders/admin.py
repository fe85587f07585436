from django.contrib import admin
from django.utils.html import format_html

from saga.admin import ReadOnlyAdminMixin
from saga.models import SagaInstance

from .models import Order, OrderLine


class OrderLineInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = OrderLine
    extra = 0
    fields = ["sku", "name", "quantity", "unit_price"]
    readonly_fields = fields


@admin.register(Order)
class OrderAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "status", "email", "total", "currency", "created_at", "saga_link"]
    list_filter = ["status", "created_at"]
    search_fields = ["=id", "email"]
    date_hierarchy = "created_at"
    inlines = [OrderLineInline]
    readonly_fields = [
        "id",
        "status",
        "user_id",
        "email",
        "phone",
        "total",
        "currency",
        "failure_reason",
        "cancel_requested_at",
        "idempotency_key",
        "created_at",
        "updated_at",
        "saga_link",
        "payments_link",
        "notifications_link",
    ]
    fields = readonly_fields

    @admin.display(description="saga")
    def saga_link(self, order: Order) -> str:
        saga = SagaInstance.objects.filter(order_id=order.id).only("id", "status").first()
        if saga is None:
            return "-"
        return format_html('<a href="/admin/saga/sagainstance/{}/change/">{}</a>', saga.id, saga.status)

    @admin.display(description="payments")
    def payments_link(self, order: Order) -> str:
        return format_html('<a href="/admin/payments/payment/?order_id={}">payments</a>', order.id)

    @admin.display(description="notifications")
    def notifications_link(self, order: Order) -> str:
        return format_html('<a href="/admin/notifications/notification/?order_id={}">notifications</a>', order.id)
