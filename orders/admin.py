from django.contrib import admin
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from common.admin_links import order_notifications_link, order_payments_link
from common.admin_mixins import DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin
from saga.models import SagaInstance

from .models import Order, OrderLine


class OrderLineInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = OrderLine
    extra = 0
    fields = readonly_fields = ("sku", "name", "quantity", "unit_price")


@admin.register(Order)
class OrderAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "status", "email", "total", "currency", "created_at", "saga_link"]
    list_filter = ["status", "currency", "created_at"]
    search_fields = ["=id", "email", "=idempotency_key"]
    date_hierarchy = "created_at"
    inlines = [OrderLineInline]
    readonly_fields = fields = (
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
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        # The saga lives in the same (orders) database: one query for the whole page.
        sagas = SagaInstance.objects.filter(order_id=OuterRef("pk"))
        return (
            super()
            .get_queryset(request)
            .annotate(saga_pk=Subquery(sagas.values("id")[:1]), saga_status=Subquery(sagas.values("status")[:1]))
        )

    @admin.display(description="saga", ordering="saga_status")
    def saga_link(self, order: Order) -> str:
        if getattr(order, "saga_pk", None) is None:
            return "-"
        # saga_pk and saga_status are annotations of get_queryset.
        url = reverse("admin:saga_sagainstance_change", args=[getattr(order, "saga_pk")])  # noqa: B009
        return format_html('<a href="{}">{}</a>', url, getattr(order, "saga_status"))  # noqa: B009

    @admin.display(description="payments")
    def payments_link(self, order: Order) -> str:
        return order_payments_link(order.id, "payment and refund")

    @admin.display(description="notifications")
    def notifications_link(self, order: Order) -> str:
        return order_notifications_link(order.id, "notifications")
