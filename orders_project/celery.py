"""The Celery app shared by every process.

Each worker registers only its own service's tasks: `CELERY_SERVICE` names the service
(`orders`, `saga`, `inventory`, `payments`, `notifications`) whose `tasks` module is
imported. Other services are reached by task name through `app.signature(...)`, as
separate deployments would be. The web process, beat and Flower set no service and
register no task of ours.
"""

import contextlib
import os
import select
from typing import Any

from celery import Celery, signals

from . import kombu_fixes

kombu_fixes.apply()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")

SERVICES = ("orders", "saga", "inventory", "payments", "notifications")

app = Celery("orders_project")
app.config_from_object("django.conf:settings", namespace="CELERY")


def _service_packages() -> list[str]:
    service = os.environ.get("CELERY_SERVICE", "").strip()
    if not service:
        return []
    if service not in SERVICES:
        raise RuntimeError(f"CELERY_SERVICE={service!r} is not one of {', '.join(SERVICES)}")
    return [service]


app.autodiscover_tasks(_service_packages)


# Before each task: a connection PostgreSQL has closed (a restart, a failover, an admin's
# pg_terminate_backend, idle_session_timeout) is dropped, so the task and its result's
# write (the result backend shares `default`) open a new one instead of failing on it
# (issue 15). PostgreSQL says so on the connection itself: it sends a FATAL notice and
# closes its end, so the idle socket turns readable. Asking the socket is one poll() per
# open connection and no round trip; CONN_HEALTH_CHECKS would be a SELECT 1 per
# connection per task. A connection cut without a word (a network partition) is still
# found by the first query that uses it: the task retries (common.steps, saga.tasks) and
# the result backend retries its write (orders_project.result_backend).
@signals.task_prerun.connect
def _close_connections_closed_by_server(task: object = None, **_: object) -> None:
    if getattr(getattr(task, "request", None), "is_eager", False):
        return
    from django.db import DatabaseError, connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is None or connection.in_atomic_block:
            continue
        if _closed_by_server(connection.connection):
            with contextlib.suppress(DatabaseError):
                connection.close()


def _closed_by_server(raw: Any) -> bool:
    """Whether the server has spoken on an idle connection. Between queries it has nothing
    to say unless it is closing the session (no LISTEN here, no asynchronous notices)."""
    try:
        fd = raw.fileno()
    except Exception:  # psycopg: "the connection is lost"
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # POLLHUP and POLLERR are always reported
    return bool(poller.poll(0))


# What a web request gets from Django (request_finished): after each task, a connection
# past CONN_MAX_AGE, or broken by an error, is closed; the rest are kept for the next
# task. The Celery fixup would close all of them (settings.CELERY_DB_REUSE_MAX says why not).
@signals.task_postrun.connect
def _close_old_connections(sender: object = None, **_: object) -> None:
    # An eager task (unit tests) runs inside its caller's transaction: leave it alone.
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


# Tracing (orders_project.telemetry) is set up in each pool process, after the fork: an
# exporter's threads and gRPC channel do not survive one. Off unless OTEL_* says where to.
@signals.worker_process_init.connect
def _setup_tracing(**_: object) -> None:
    from . import telemetry

    telemetry.setup(celery=True)


@signals.worker_process_shutdown.connect
def _flush_spans(**_: object) -> None:
    from . import telemetry

    telemetry.shutdown()
