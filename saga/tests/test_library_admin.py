"""The admin pages of Celery's results and beat's schedule only show them.

The web's database role reads those tables and writes none (orders_project.db_roles), so
an edit, a delete or a bulk action there was a 500 for a superuser. Here the test
database's owner would let such a write through: the pages must not offer it at all.
"""

import pytest
from django.contrib import admin
from django.test import Client
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from saga.admin import LIBRARY_MODELS

pytestmark = [
    # The admin's pages read every service's database (its sidebar, the order links).
    pytest.mark.django_db(databases="__all__"),
    # WhiteNoise, in this process's admin client: static files are served from the apps.
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

CHANGELIST = "/admin/django_celery_beat/periodictask/"


@pytest.fixture
def sweep() -> PeriodicTask:
    """The sweep's entry, as beat writes it from the settings."""
    interval, _ = IntervalSchedule.objects.get_or_create(every=2, period=IntervalSchedule.SECONDS)
    defaults = {"task": "saga.sweep", "interval": interval}
    task, _ = PeriodicTask.objects.get_or_create(name="saga-sweep", defaults=defaults)
    return task


def test_no_library_record_can_be_added_changed_or_deleted(rf, admin_user) -> None:
    request = rf.get("/admin/")
    request.user = admin_user
    for model in LIBRARY_MODELS:
        model_admin = admin.site.get_model_admin(model)
        assert model_admin.has_view_permission(request)
        assert not model_admin.has_add_permission(request)
        assert not model_admin.has_change_permission(request)
        assert not model_admin.has_delete_permission(request)
        assert model_admin.get_actions(request) == {}, model.__name__


def test_a_bulk_action_on_the_schedule_changes_nothing(admin_client: Client, sweep: PeriodicTask) -> None:
    page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    assert b"saga-sweep" in page.content
    response = admin_client.post(CHANGELIST, {"action": "disable_tasks", "_selected_action": [sweep.pk], "index": 0})
    assert response.status_code in (200, 302)
    sweep.refresh_from_db()
    assert sweep.enabled


def test_the_schedule_is_shown_not_edited(admin_client: Client, sweep: PeriodicTask) -> None:
    page = admin_client.get(f"{CHANGELIST}{sweep.pk}/change/")
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    response = admin_client.post(f"{CHANGELIST}{sweep.pk}/change/", {"name": "renamed", "enabled": ""})
    assert response.status_code == 403
    sweep.refresh_from_db()
    assert sweep.name == "saga-sweep" and sweep.enabled
