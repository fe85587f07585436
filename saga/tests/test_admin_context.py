"""The saga's admin page shows what every step receives, but not the customer's card."""

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from .coordinator import start

pytestmark = [
    # The saga's page reads every service's database (its sidebar, the order links).
    pytest.mark.django_db(databases="__all__"),
    # WhiteNoise, in this process's admin client: static files are served from the apps.
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]


def test_the_saga_page_shows_the_context_without_the_card_token() -> None:
    saga = start(email="ctx@example.com", payment_token="tok_visa_secretish", total="12.00")
    viewer = get_user_model().objects.create_user("saga-viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_sagainstance"))
    client = Client()
    client.force_login(viewer)

    page = client.get(f"/admin/saga/sagainstance/{saga.id}/change/")

    assert page.status_code == 200
    text = page.content.decode()
    assert "ctx@example.com" in text and "12.00" in text  # the rest of the context is there
    assert "tok_visa_secretish" not in text
    assert "(hidden)" in text
