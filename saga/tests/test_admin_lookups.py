"""A list page filters by its query string only on what it offers (common.admin_mixins)."""

from decimal import Decimal

import pytest
from django.contrib import admin

from common.admin_mixins import DeclaredFiltersOnlyMixin
from orders.models import Order

from .coordinator import staff_client

pytestmark = [
    pytest.mark.django_db(databases="__all__"),
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

PROJECT_APPS = {"orders", "saga", "payments", "inventory", "notifications", "common", "django_celery_results"}


def test_a_view_only_account_cannot_read_a_hidden_card_token_by_filtering_on_it() -> None:
    order = Order.objects.create(
        user_id=1, email="lookup@example.com", payment_token="tok_visa_hidden", total=Decimal("5.00"), currency="EUR"
    )
    client = staff_client("view_order", "view_sagainstance", "view_fakeprovideroperation", "view_payment")

    # Each answered 200, with the order only when the guessed prefix was right.
    for probe in (
        "/admin/orders/order/?payment_token__startswith=tok_visa_h",
        "/admin/orders/order/?payment_token__regex=^tok_v",
        "/admin/saga/sagainstance/?context__payment_token__startswith=tok_v",
        "/admin/payments/fakeprovideroperation/?token__startswith=tok_v",
        "/admin/orders/order/?email__startswith=lookup",  # shown, but not a filter the page offers
    ):
        assert client.get(probe).status_code == 400, probe

    # What the pages offer still filters, and the project's own links still work.
    offered = client.get("/admin/orders/order/?status__exact=pending&created_at__gte=2000-01-01")
    assert offered.status_code == 200 and str(order.id) in offered.content.decode()
    assert client.get(f"/admin/payments/payment/?order_id={order.id}").status_code == 200


def test_every_list_page_of_the_project_and_its_libraries_filters_only_on_what_it_offers() -> None:
    pages = [
        (model, model_admin)
        for model, model_admin in admin.site._registry.items()
        if model._meta.app_label in PROJECT_APPS or model._meta.app_label == "django_celery_beat"
    ]
    assert len(pages) > 10
    assert [model for model, model_admin in pages if not isinstance(model_admin, DeclaredFiltersOnlyMixin)] == []


def test_a_filter_on_a_related_field_is_offered_with_its_lookups() -> None:
    from saga.models import SagaStep

    class StepAdmin(DeclaredFiltersOnlyMixin, admin.ModelAdmin):
        list_filter = ["saga__status", ("phase", admin.ChoicesFieldListFilter)]

    page = StepAdmin(SagaStep, admin.site)
    assert page.lookup_allowed("saga__status__exact", "running", None)
    assert page.lookup_allowed("phase__exact", "forward", None)
    assert not page.lookup_allowed("saga__context__payment_token__startswith", "tok", None)
    assert not page.lookup_allowed("saga", "x", None)
    assert not page.lookup_allowed("name__startswith", "x", None)
