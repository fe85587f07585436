"""The Celery app shared by every process.

Each worker registers only its own service's tasks: `CELERY_SERVICE` names the service
(`orders`, `saga`, `inventory`, `payments`, `notifications`) whose `tasks` module is
imported. Other services are reached by task name through `app.signature(...)`, as
separate deployments would be. The web process, beat and Flower set no service and
register no task of ours.
"""

import os
import sys

from celery import Celery, signals

from common import billiard_fixes, celery_fixes, kombu_fixes
from orders_project.db_health import close_connections_closed_by_server

billiard_fixes.apply()
celery_fixes.apply()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_project.settings")
# Celery's Django fixup runs Django's system checks at every worker start: with the URL
# checks they import the whole web side (every view, DRF, drf-spectacular, the admin), a
# fifth of a worker's start-up CPU, for checks of code that `migrate` (a deploy's first
# job), `manage.py check` and the tests already ran. A worker started after a SIGKILL
# takes its queue's messages that much sooner (issue 11). CELERY_SKIP_CHECKS= (empty)
# in the environment runs them again.
os.environ.setdefault("CELERY_SKIP_CHECKS", "1")
if "flower" in sys.argv:
    # Flower monitors. Its controls (revoke a task id before it exists, terminate, send a
    # task, shut a worker down) would let a Flower login hold back a chosen customer's
    # refund; operators act in the admin, which audits them (docs/SECURITY.md). Read
    # before the flower command applies its FLOWER_* variables; FLOWER_READ_ONLY=false
    # turns the controls on.
    os.environ.setdefault("FLOWER_READ_ONLY", "true")

SERVICES = ("orders", "saga", "inventory", "payments", "notifications")  # a queue each
kombu_fixes.apply(delivery_kept=SERVICES)

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


# Before each task: drop the connections PostgreSQL has closed, so the task and its
# result's write (the result backend shares `default`) open new ones (issue 15).
@signals.task_prerun.connect
def _close_connections_closed_by_server(task: object = None, **_: object) -> None:
    if getattr(getattr(task, "request", None), "is_eager", False):
        return
    close_connections_closed_by_server()


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


# A Flower login may read what a worker holds and how it is configured, not the customers'
# data in its messages or the broker's password (common.worker_control).
@signals.worker_init.connect
def _control_answers_without_secrets(**_: object) -> None:
    from common import worker_control

    # Each service has a queue of its own name (SERVICES).
    worker_control.register(own_queue=next(iter(_service_packages()), None))


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
