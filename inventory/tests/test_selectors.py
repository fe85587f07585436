import uuid
from decimal import Decimal

import pytest

from inventory.exceptions import InsufficientStock, PriceChanged
from inventory.models import Product
from inventory.selectors import product_prices, stock_check
from inventory.services import stock_reserve

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


def test_a_stock_check_after_its_own_sagas_reservation_passes_and_another_sagas_fails() -> None:
    """place_order v2 checks stock, then reserves. A copy of the check that runs after the
    reservation (a redelivery, the sweeper re-publishing from the check when the charge's
    message was lost) counted the saga's own hold as taken: InsufficientStock, and an order
    whose stock and payment were fine failed."""
    sku, mine, theirs = _sku(), uuid.uuid4(), uuid.uuid4()
    Product.objects.using("inventory").create(sku=sku, name="Last one", price=Decimal("5.00"), on_hand=1)
    lines = [(sku, 1, Decimal("5.00"))]
    assert stock_check(saga_id=mine, lines=lines) == {"checked": [sku]}
    stock_reserve(saga_id=mine, order_id=uuid.uuid4(), lines=lines)

    assert stock_check(saga_id=mine, lines=lines)["checked"] == [sku]
    with pytest.raises(InsufficientStock):
        stock_check(saga_id=theirs, lines=lines)
    Product.objects.using("inventory").filter(sku=sku).update(price=Decimal("6.00"))
    assert stock_check(saga_id=mine, lines=lines)["checked"] == [sku]  # its price was settled at the reserve
    with pytest.raises(PriceChanged):
        stock_check(saga_id=theirs, lines=lines)
