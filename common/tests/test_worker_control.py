"""What a worker answers to a control command (common.worker_control), on the app's real
settings and Celery's own control panel: no worker runs (tests/test_messages.py asks a
live one)."""

import json
from types import SimpleNamespace

import pytest
from celery.worker import control
from celery.worker.consumer import consumer
from django.conf import settings

from common import worker_control
from orders_project.celery import app

celery_dump_body = consumer.dump_body
PASSWORDS = ("brokerpw", "cachepw", "breakerpw")


@pytest.fixture
def registered() -> object:
    """worker_control.register() in this process, as the notifications worker's, undone
    afterwards (a worker keeps it)."""
    before = dict(control.Panel.data), dict(control.Panel.meta), consumer.dump_body
    worker_control.register(own_queue="notifications")
    yield
    for table, saved in zip((control.Panel.data, control.Panel.meta), before[:2], strict=True):
        table.clear()
        table.update(saved)
    consumer.dump_body = before[2]


def test_conf_masks_the_password_of_every_url(monkeypatch: pytest.MonkeyPatch, registered: object) -> None:
    """Celery masks `broker_url` by that name, which the CELERY_ namespace misses, and none
    of the other URLs: a Flower login read the broker's password in its Config tab."""
    # On the settings themselves, as a worker's environment would set them (Django's
    # override_settings holder is not a settings object Celery can list).
    monkeypatch.setattr(settings, "CELERY_BROKER_URL", "amqp://svc:brokerpw@rabbit:5672//")
    monkeypatch.setattr(settings, "CACHE_URL", "redis://:cachepw@cache:6379/1")
    monkeypatch.setattr(settings, "PAYMENT_BREAKER_REDIS_URL", "rediss://user:breakerpw@redis:6380/0")
    state = SimpleNamespace(app=app)

    celerys = json.dumps(control.conf(state), default=str)
    assert all(password in celerys for password in PASSWORDS)  # Celery's own answer

    ours = json.dumps(control.Panel.data["conf"](state), default=str)
    for password in PASSWORDS:
        assert password not in ours
    # What an operator needs is still there: where each one is.
    assert "amqp://svc:********@rabbit:5672//" in ours
    assert "rediss://user:********@redis:6380/0" in ours
    assert "cache:6379/1" in ours
    assert control.Panel.meta["conf"].type == "inspect"


def test_urls_without_a_password_and_other_values_are_left_alone() -> None:
    value = {"a": "redis://cache:6379/1", "b": ["postgres://u:pw@db/x", 3], "c": "not a url", "d": None}
    assert worker_control.without_passwords(value) == {
        "a": "redis://cache:6379/1",
        "b": ["postgres://u:********@db/x", 3],
        "c": "not a url",
        "d": None,
    }


def test_a_message_a_worker_cannot_run_is_shown_by_its_ids_and_reprs_not_its_body(registered: object) -> None:
    from celery.contrib.testing.mocks import TaskMessage

    message = TaskMessage(
        "inventory.reserve",
        id="s-reserve_inventory-g0",
        args=({"saga_id": "s", "email": "leak@example.com"},),
        kwargs={"authority": "eyJzYWdh-secret"},
        argsrepr="(<saga s context>,)",
        kwargsrepr="{'authority': <forward step reserve_inventory g0>}",
    )
    celerys = celery_dump_body(message, message.body)
    assert "leak@example.com" in celerys and "eyJzYWdh" in celerys  # Celery's own

    shown = consumer.dump_body(message, message.body)  # what the worker's consumer calls
    assert "leak@example.com" not in shown and "eyJzYWdh" not in shown
    assert "s-reserve_inventory-g0" in shown and "<saga s context>" in shown
    assert f"{len(message.body)}b" in shown


def test_a_worker_adds_no_queue_but_its_own(registered: object) -> None:
    calls: list[tuple] = []
    consumer = SimpleNamespace(call_soon=lambda *a, **k: calls.append(a), add_task_queue=None)
    state = SimpleNamespace(app=app, consumer=consumer)

    refused = control.Panel.data["add_consumer"](state, queue="payments")
    assert "refused" in refused["error"] and "notifications" in refused["error"]
    assert calls == []

    assert control.Panel.data["add_consumer"](state, queue="notifications") == {"ok": "add consumer notifications"}
    assert [call[1] for call in calls] == ["notifications"]

    worker_control.register(own_queue=None)  # a worker that names no service
    assert "error" in control.Panel.data["add_consumer"](state, queue="notifications")
