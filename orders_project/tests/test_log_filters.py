"""A quiet system's log is quiet: the sweeper's routine runs write nothing at INFO.

The records here are made as Celery makes them (its own format strings and arguments);
tests/test_quiet_logs.py checks the running processes' logs.
"""

import logging
from collections.abc import Iterator

import pytest
from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS
from django.conf import settings

from orders_project.log import QuietHousekeepingFilter

BEAT_SENDING = "Scheduler: Sending due task %s (%s)"  # celery.beat.Scheduler.apply_entry


def record(logger: str, msg: str, args: object, level: int = logging.INFO) -> logging.LogRecord:
    # A single mapping argument becomes record.args itself, as in a logger.info(msg, {...}) call.
    return logging.LogRecord(logger, level, __file__, 1, msg, (args,) if isinstance(args, dict) else args, None)


def received(task: str) -> logging.LogRecord:
    return record("celery.worker.strategy", LOG_RECEIVED, {"id": "t-1", "name": task, "args": "()", "kwargs": "{}"})


def succeeded(task: str, return_value: str) -> logging.LogRecord:
    context = {"id": "t-1", "name": task, "return_value": return_value, "runtime": 0.01, "args": "()", "kwargs": "{}"}
    return record("celery.app.trace", LOG_SUCCESS, context)


@pytest.fixture
def root_at_info() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def test_every_process_logs_through_the_filter() -> None:
    assert settings.LOGGING["filters"]["quiet_housekeeping"] == {"()": "orders_project.log.QuietHousekeepingFilter"}
    assert "quiet_housekeeping" in settings.LOGGING["handlers"]["console"]["filters"]


def test_a_sweep_that_found_nothing_writes_no_line(root_at_info: None) -> None:
    quiet = QuietHousekeepingFilter()
    lines = [
        record("celery.beat", BEAT_SENDING, ("saga-sweep", "saga.sweep")),
        received("saga.sweep"),
        succeeded("saga.sweep", "{}"),
    ]
    assert [line.getMessage() for line in lines if quiet.filter(line)] == []


def test_a_sweep_that_acted_and_every_other_task_still_log(root_at_info: None) -> None:
    quiet = QuietHousekeepingFilter()
    kept = [
        succeeded("saga.sweep", "{'republished': 1}"),
        record("saga.sweeper", "saga %s: step %s stalled past its deadline: %s", ("s", "charge", "x"), logging.WARNING),
        received("saga.step_succeeded"),
        succeeded("saga.step_succeeded", "None"),
        record("celery.beat", BEAT_SENDING, ("celery.backend_cleanup", "celery.backend_cleanup")),
    ]
    assert [quiet.filter(line) for line in kept] == [True] * len(kept)


def test_at_debug_the_routine_lines_are_kept() -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        assert QuietHousekeepingFilter().filter(received("saga.sweep"))
    finally:
        root.setLevel(level)


def test_the_pools_debug_line_with_each_tasks_raw_arguments_stays_off_at_debug() -> None:
    import copy
    import logging.config

    from django.conf import settings

    debug = copy.deepcopy(settings.LOGGING)
    debug["root"]["level"] = "DEBUG"  # LOG_LEVEL=DEBUG
    logging.config.dictConfig(debug)
    try:
        assert not logging.getLogger("celery.pool").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("celery.worker").isEnabledFor(logging.DEBUG)  # the rest is as asked
    finally:
        logging.config.dictConfig(settings.LOGGING)
