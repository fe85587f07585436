import uuid
from decimal import Decimal

import pytest

from inventory.models import Product
from inventory.selectors import product_prices

pytestmark = pytest.mark.django_db(databases=["inventory"])


def _sku() -> str:
    return f"T-{uuid.uuid4().hex[:10].upper()}"


def test_product_prices_reads_what_the_orm_reads() -> None:
    skus = [_sku() for _ in range(3)]
    for sku, price in zip(skus, ["12.50", "0.00", "99999999.99"], strict=True):
        Product.objects.using("inventory").create(sku=sku, name=f"Name of {sku} ✓", price=Decimal(price), on_hand=7)
    asked = [*skus, _sku()]  # one unknown: absent

    prices = product_prices(skus=asked)
    orm = {p.sku: p for p in Product.objects.filter(sku__in=asked).only("sku", "name", "price")}

    assert sorted(prices) == sorted(orm) == sorted(skus)
    for sku, product in prices.items():
        expected = orm[sku]
        assert type(product) is Product
        assert (product.pk, product.sku, product.name) == (expected.pk, sku, expected.name)
        assert product.price == expected.price
        assert type(product.price) is Decimal and str(product.price) == str(expected.price)
        assert product.get_deferred_fields() == expected.get_deferred_fields()
        assert (product._state.db, product._state.adding) == ("inventory", False)


def test_product_prices_of_nothing_is_empty() -> None:
    assert product_prices(skus=[]) == {}
    assert product_prices(skus=iter([_sku()])) == {}
