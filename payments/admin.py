from django.contrib import admin

from saga.admin import ReadOnlyAdminMixin

from .models import FakeProviderOperation, Payment, ProcessedKey, Refund


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "order_id", "amount", "currency", "status", "decline_code", "created_at"]
    list_filter = ["status", "decline_code", "created_at"]
    search_fields = ["=id", "=order_id", "=saga_id", "provider_charge_id"]


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["payment", "amount", "provider_refund_id", "created_at"]


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]


@admin.register(FakeProviderOperation)
class FakeProviderOperationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["kind", "reference", "amount", "currency", "outcome", "code", "created_at"]
    list_filter = ["kind", "outcome"]
