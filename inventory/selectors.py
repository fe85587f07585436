from collections.abc import Iterable

from django.db.models import F, QuerySet

from .models import Product


def product_list() -> QuerySet[Product]:
    return Product.objects.annotate(available_units=F("on_hand") - F("reserved")).order_by("sku")


def product_prices(*, skus: Iterable[str]) -> dict[str, Product]:
    """The catalogue entries for `skus`, by SKU; unknown SKUs are simply absent."""
    return {p.sku: p for p in Product.objects.filter(sku__in=list(skus)).only("sku", "name", "price")}
