"""Log lines that say which saga, order and trace they belong to.

`TaskContextFilter` (on the console handler, settings.LOGGING) gives every record the
saga id, order id and trace id of the Celery task running in this process, if any, and
the trace id of the current span otherwise (a web request). `LOG_FORMAT=json` (compose)
writes one JSON object per line; the default `text` is for people:

    2026-01-05 10:00:00,123 INFO celery.app.trace [saga=6f1c... order=0b9e... trace=4bf9...] Task ...
"""

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

# Periodic housekeeping whose routine runs say nothing at INFO: the sweeper, which beat
# sends every SAGA_SWEEP_INTERVAL seconds (docs/OPERATIONS.md, "Failures and recovery"). A sweep that
# acts says so: saga.sweeper and saga.recovery log each re-publish, compensation and
# restored message at WARNING, and its "succeeded" line carries a non-empty result.
QUIET_TASKS = frozenset({"saga.sweep"})
# The result of a sweep that found nothing to do (saga.sweeper.saga_sweep).
ROUTINE_RESULTS = frozenset({"{}", "None"})


def _routine_housekeeping(record: logging.LogRecord) -> bool:
    """Is this one of Celery's INFO lines about a routine run of a QUIET_TASKS task:
    beat sending it, the worker receiving it, or its success with nothing done?"""
    args = record.args
    if record.name == "celery.beat":
        # celery.beat.Scheduler.apply_entry: "Scheduler: Sending due task %s (%s)", name, task
        return (
            str(record.msg).startswith("Scheduler: Sending due task")
            and isinstance(args, tuple)
            and len(args) == 2
            and args[1] in QUIET_TASKS
        )
    if not isinstance(args, Mapping) or args.get("name") not in QUIET_TASKS:
        return False
    if record.name == "celery.worker.strategy":  # celery.app.trace.LOG_RECEIVED
        return True
    # celery.app.trace.LOG_SUCCESS, with the result's repr as return_value
    return record.name == "celery.app.trace" and args.get("return_value") in ROUTINE_RESULTS


class QuietHousekeepingFilter(logging.Filter):
    """Drops the INFO lines of routine housekeeping (`_routine_housekeeping`), so that a
    quiet system's log is quiet: without it beat and the saga worker write three lines per
    sweep, every second or two, whether or not anything happened. With LOG_LEVEL=DEBUG
    they are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        return not _routine_housekeeping(record)


def task_ids(request: Any) -> tuple[str, str]:
    """(saga id, order id) of a Celery task request: from the saga context a participant
    receives (first argument), or the coordinator's `saga_id` keyword argument."""
    saga_id = order_id = ""
    args = getattr(request, "args", None) or ()
    context = args[0] if args and isinstance(args[0], Mapping) else {}
    kwargs = getattr(request, "kwargs", None) or {}
    saga_id = str(context.get("saga_id") or kwargs.get("saga_id") or "")
    # The coordinator's failure report carries no context: saga.tracing looks the order up.
    order_id = str(context.get("order_id") or getattr(request, "saga_order_id", "") or "")
    return saga_id[:64], order_id[:64]


def _trace_id_from_traceparent(value: Any) -> str:
    # W3C traceparent: 00-<32 hex trace id>-<16 hex span id>-<flags>
    parts = value.split("-") if isinstance(value, str) else []
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


class TaskContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        saga_id = order_id = task_id = task_name = trace_id = span_id = ""
        try:
            from celery import current_task

            from orders_project.telemetry import current_trace_ids

            request = getattr(current_task, "request", None) if current_task else None
            if request is not None and getattr(request, "id", None):
                saga_id, order_id = task_ids(request)
                task_id, task_name = str(request.id), str(getattr(current_task, "name", "") or "")
            trace_id, span_id = current_trace_ids()
            if not trace_id and request is not None:
                # Tracing off in this process, or between spans: the message still says.
                trace_id = _trace_id_from_traceparent(getattr(request, "traceparent", None))
        except Exception:  # a log line must never fail for want of its context
            pass
        record.saga_id, record.order_id, record.trace_id, record.span_id = saga_id, order_id, trace_id, span_id
        record.task_id, record.task_name = task_id, task_name
        return True


class DelayedDeliveryNoticeFilter(logging.Filter):
    """Drops the warning Celery logs at each countdown (a retry) published to a quorum queue
    behind a direct exchange: keeping retries out of native delayed delivery is our choice
    (settings, CELERY_QUEUE_TYPE), and a warning per retry would bury real ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Direct exchanges are not supported with native delayed delivery")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        ids = [
            f"{label}={value}"
            for label, value in (
                ("saga", getattr(record, "saga_id", "")),
                ("order", getattr(record, "order_id", "")),
                ("trace", getattr(record, "trace_id", "")),
            )
            if value
        ]
        if ids:
            record.message = f"[{' '.join(ids)}] {record.message}"
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (Loki, CloudWatch, ...) parse as is."""

    service = os.environ.get("OTEL_SERVICE_NAME") or (
        f"worker-{os.environ['CELERY_SERVICE']}" if os.environ.get("CELERY_SERVICE") else "web"
    )

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "process": record.process,
            "saga_id": getattr(record, "saga_id", "") or None,
            "order_id": getattr(record, "order_id", "") or None,
            "trace_id": getattr(record, "trace_id", "") or None,
        }
        for key in ("span_id", "task_id", "task_name"):
            if value := getattr(record, key, ""):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)
