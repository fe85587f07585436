from django.contrib import admin

from saga.admin import ReadOnlyAdminMixin

from .models import ProcessedKey, Product, Reservation


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "price", "on_hand", "reserved", "available"]
    search_fields = ["sku", "name"]
    # Reserved units move only with reservations: editing them by hand breaks the books.
    readonly_fields = ["reserved", "created_at", "updated_at"]


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["saga_id", "order_id", "sku", "quantity", "unit_price", "status", "created_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["=saga_id", "=order_id", "sku"]


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]
