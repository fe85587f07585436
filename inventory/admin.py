from django import forms
from django.contrib import admin, messages
from django.db import connections, router
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from common.admin_mixins import DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin

from . import services
from .exceptions import ProductExists, StockBelowReserved
from .models import ProcessedKey, Product, Reservation


class ProductForm(forms.ModelForm):
    """Stock changes by a signed amount, never by overwriting on hand: the service applies
    it in one conditional update, so reservations taken meanwhile stay consistent."""

    on_hand_delta = forms.IntegerField(
        required=False,
        initial=0,
        label="Adjust on hand by",
        help_text="+N for goods received, -N for a count correction or write-off. Units that orders "
        "hold (reserved) cannot be taken away.",
    )

    class Meta:
        model = Product
        fields = ["sku", "name", "price", "on_hand"]

    def clean_on_hand_delta(self) -> int:
        delta = self.cleaned_data.get("on_hand_delta") or 0
        product = self.instance
        if product.pk and product.on_hand + delta < product.reserved:
            # Checked again, under no race, by the service's conditional update.
            raise forms.ValidationError(
                f"That leaves {product.on_hand + delta} on hand, below the {product.reserved} units orders hold."
            )
        return delta


class AvailabilityFilter(admin.SimpleListFilter):
    title = "availability"
    parameter_name = "availability"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("sold_out", "sold out"), ("available", "available")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "sold_out":
            return queryset.filter(on_hand__lte=F("reserved"))
        if self.value() == "available":
            return queryset.filter(on_hand__gt=F("reserved"))
        return queryset


def catalogue_writable(request: HttpRequest) -> bool:
    """Whether this process's database role may change products, asked once per request.

    The running web's role may only read the catalogue (docs/SECURITY.md): there the admin
    shows products read-only instead of failing on save. `manage.py` (the owner) may write.
    """
    if not hasattr(request, "_catalogue_writable"):
        with connections[router.db_for_write(Product)].cursor() as cursor:
            cursor.execute("SELECT has_table_privilege(%s, 'UPDATE')", [Product._meta.db_table])
            request._catalogue_writable = cursor.fetchone()[0]  # type: ignore[attr-defined]
    return request._catalogue_writable  # type: ignore[attr-defined]


@admin.register(Product)
class ProductAdmin(DeclaredFiltersOnlyMixin, admin.ModelAdmin):
    """Products are created and changed through inventory.services, never by saving the row:
    `reserved` moves only with reservations in flight, `on_hand` by adjustments and by sales
    (a confirmed order's reservation, settled: inventory.services.stock_sell). What was
    sold is listed under Reservations, status "sold"."""

    form = ProductForm
    list_display = ["sku", "name", "price", "on_hand", "reserved", "available", "updated_at"]
    list_filter = [AvailabilityFilter, "updated_at"]
    search_fields = ["sku", "name"]

    def get_fields(self, request: HttpRequest, obj: Product | None = None) -> list[str]:  # type: ignore[override]
        if obj is None:
            return ["sku", "name", "price", "on_hand"]
        return ["sku", "name", "price", "on_hand", "reserved", "available", "on_hand_delta", "created_at", "updated_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Product | None = None) -> list[str]:
        if obj is None:
            return []
        return ["sku", "on_hand", "reserved", "available", "created_at", "updated_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return super().has_add_permission(request) and catalogue_writable(request)

    def has_change_permission(self, request: HttpRequest, obj: Product | None = None) -> bool:
        return super().has_change_permission(request, obj) and catalogue_writable(request)

    def has_delete_permission(self, request: HttpRequest, obj: Product | None = None) -> bool:
        # Reservations and orders refer to products by SKU: retire one by taking its stock to 0.
        return False

    def save_model(self, request: HttpRequest, obj: Product, form: ProductForm, change: bool) -> None:
        data = form.cleaned_data
        try:
            if change:
                product = services.product_update(
                    sku=obj.sku, name=data["name"], price=data["price"], on_hand_delta=data.get("on_hand_delta") or 0
                )
            else:
                product = services.product_create(
                    sku=data["sku"], name=data["name"], price=data["price"], on_hand=data["on_hand"]
                )
        except (StockBelowReserved, ProductExists) as refused:
            request._stock_refused = str(refused)  # type: ignore[attr-defined]  # reported by response_*
            return
        obj.pk, obj.on_hand, obj.reserved = product.pk, product.on_hand, product.reserved

    def response_change(self, request: HttpRequest, obj: Product) -> HttpResponse:
        if refused := getattr(request, "_stock_refused", None):
            # Orders reserved units between the form and the save: nothing was changed.
            self.message_user(request, f"Not changed: {refused}", messages.ERROR)
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def response_add(self, request: HttpRequest, obj: Product, post_url_continue: str | None = None) -> HttpResponse:
        if refused := getattr(request, "_stock_refused", None):
            # Another operator added this SKU between the form's check and the save.
            self.message_user(request, f"Not added: {refused}", messages.ERROR)
            return HttpResponseRedirect(request.path)
        return super().response_add(request, obj, post_url_continue)


@admin.register(Reservation)
class ReservationAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "saga_id",
        "order_id",
        "sku",
        "quantity",
        "unit_price",
        "status",
        "created_at",
        "released_at",
        "sold_at",
    ]
    list_filter = ["status", "created_at"]
    search_fields = ["=saga_id", "=order_id", "sku"]


@admin.register(ProcessedKey)
class ProcessedKeyAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["key", "created_at"]
    search_fields = ["key"]
