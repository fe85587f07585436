"""Beat's scheduler reads django-celery-beat's change marker at most once a second."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django_celery_beat import schedulers

from orders_project import beat

from .startup import django_setup

BASE_DIR = Path(__file__).resolve().parents[2]
SCHEDULER = "orders_project.beat:ThrottledDatabaseScheduler"


class _Marker:
    """Stands in for `PeriodicTasks`: when the schedule last changed, and how often it was asked."""

    def __init__(self) -> None:
        self.changed = datetime(2026, 1, 1, tzinfo=UTC)
        self.reads = 0

    def last_change(self) -> datetime:
        self.reads += 1
        return self.changed


@pytest.fixture
def scheduler(monkeypatch: pytest.MonkeyPatch) -> tuple[beat.ThrottledDatabaseScheduler, _Marker, list[float]]:
    clock = [1000.0]
    marker = _Marker()
    monkeypatch.setattr(beat.time, "monotonic", lambda: clock[0])
    # No database here: the marker is the only thing schedule_changed reads.
    monkeypatch.setattr(schedulers, "close_old_connections", lambda: None)
    instance = beat.ThrottledDatabaseScheduler.__new__(beat.ThrottledDatabaseScheduler)
    instance.Changes = marker
    return instance, marker, clock


def test_ticks_within_a_second_read_the_marker_once(scheduler) -> None:
    instance, marker, clock = scheduler
    # Beat's busy loop over the last 10 ms before a due entry: 25 ticks.
    for _ in range(25):
        assert instance.schedule_changed() is False
        clock[0] += 0.0004
    assert marker.reads == 1


def test_a_change_made_between_checks_is_seen_at_the_next_one(scheduler) -> None:
    instance, marker, clock = scheduler
    assert instance.schedule_changed() is False  # the first read only learns the marker
    marker.changed += timedelta(seconds=5)  # an admin disables an entry
    clock[0] += beat.CHANGE_CHECK_SECONDS / 2
    assert instance.schedule_changed() is False
    assert marker.reads == 1
    clock[0] += beat.CHANGE_CHECK_SECONDS
    assert instance.schedule_changed() is True
    assert marker.reads == 2
    clock[0] += beat.CHANGE_CHECK_SECONDS
    assert instance.schedule_changed() is False


def test_every_way_to_start_beat_uses_it() -> None:
    assert settings.CELERY_BEAT_SCHEDULER == SCHEDULER
    procfile = (BASE_DIR / "Procfile").read_text()
    compose = (BASE_DIR / "docker-compose.yml").read_text()
    assert f"--scheduler {SCHEDULER}" in procfile
    assert f"--scheduler={SCHEDULER}" in compose
    assert "django_celery_beat.schedulers:DatabaseScheduler" not in procfile + compose


@pytest.mark.parametrize("interval", ["0.5", "2.5", "0"])
def test_a_sweep_interval_beat_cannot_keep_is_refused_at_start_up(interval: str) -> None:
    """Beat's database schedule stores whole seconds: 0.5 became 0, a sweep on every tick."""
    started = django_setup(SAGA_SWEEP_INTERVAL=interval)
    assert started.returncode != 0
    assert (
        f"SAGA_SWEEP_INTERVAL must be a whole number of seconds, at least 1, not {float(interval):g}" in started.stderr
    )
