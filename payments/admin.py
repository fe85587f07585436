from django.contrib import admin

from common.admin_mixins import DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin

from .models import FakeProviderOperation, Payment, PaymentAttempt, ProcessedKey, Refund


class RefundInline(ReadOnlyAdminMixin, admin.StackedInline):
    model = Refund
    extra = 0
    can_delete = False
    fields = readonly_fields = ("amount", "provider_refund_id", "created_at")


class PaymentAttemptInline(ReadOnlyAdminMixin, admin.TabularInline):
    """Each call to the provider to charge, and how it ended: which copy of the message
    made it (its Celery task), and whether it may still be at the provider."""

    model = PaymentAttempt
    extra = 0
    can_delete = False
    fields = readonly_fields = ("task_id", "started_at", "lease_until", "finished_at", "outcome", "error")


@admin.register(Payment)
class PaymentAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    filter_lookups = ("order_id",)  # common.admin_links links here with ?order_id=
    list_display = [
        "id",
        "order_id",
        "amount",
        "currency",
        "status",
        "decline_code",
        "refunded_amount",
        "created_at",
        "updated_at",
    ]
    list_filter = ["status", "decline_code", "currency", "created_at"]
    search_fields = ["=id", "=order_id", "=saga_id", "provider_charge_id"]
    inlines = [PaymentAttemptInline, RefundInline]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("refund")

    @admin.display(description="refunded")
    def refunded_amount(self, payment: Payment) -> str:
        refund = getattr(payment, "refund", None)
        return "-" if refund is None else str(refund.amount)


@admin.register(Refund)
class RefundAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["payment", "order_id", "amount", "provider_refund_id", "created_at"]
    list_filter = ["created_at"]
    search_fields = ["=payment__order_id", "=payment__saga_id", "provider_refund_id"]
    list_select_related = ["payment"]

    @admin.display(description="order")
    def order_id(self, refund: Refund) -> str:
        return str(refund.payment.order_id)


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]


@admin.register(FakeProviderOperation)
class FakeProviderOperationAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    # The card token the charge was made with stays off the page, as the saga's page hides
    # the order's (saga.admin.HIDDEN_CONTEXT_FIELDS): a real provider's dashboard would not
    # show it to our staff either.
    exclude = ["token"]
    list_display = ["kind", "reference", "amount", "currency", "outcome", "code", "created_at"]
    list_filter = ["kind", "outcome"]
