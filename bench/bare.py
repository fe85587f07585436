"""The bare baseline: the saga's steps as a plain Celery chain, on the product's queues,
broker and databases, with none of the saga (no coordinator, no progress reports, no saga
store, no idempotency records, no result backend). Django is never loaded.

A happy order is `reserve | charge | confirm | notify("confirmed")`. A declined charge
publishes `release | fail | notify("failed")`, and a reserve without stock publishes
`fail | notify("failed")`; either then stops its own chain (Ignore). The notification row is
the end of every order: bench.sql.TERMINAL_SQL reads them.

Workers, one per queue, with the Procfile's concurrency for that queue (payments 4, the
others 2), in the directory holding `bench/`:

    export CELERY_BROKER_URL=... ORDERS_DATABASE_URL=... INVENTORY_DATABASE_URL=... \\
        PAYMENTS_DATABASE_URL=... NOTIFICATIONS_DATABASE_URL=...
    celery -A bench.bare worker -Q inventory -n bare-inventory@%h --concurrency 2 -l INFO
    celery -A bench.bare worker -Q payments -n bare-payments@%h --concurrency 4 -l INFO
    celery -A bench.bare worker -Q orders -n bare-orders@%h --concurrency 2 -l INFO
    celery -A bench.bare worker -Q notifications -n bare-notifications@%h --concurrency 2 -l INFO

Each worker registers all six tasks but consumes only its own queue.

The bare app carries the product's patches of kombu's Redis transport (common.kombu_fixes:
one Redis client per channel instead of one per command, and a torn-down connection
counted as a connection error) and of billiard's picklable tracebacks (common.billiard_fixes:
a failed task's report keeps one code position per frame, not all of them). They are library
fixes any Celery user could apply, not part of the saga: a baseline without them would credit
the saga with them (BENCHMARKS.md, twelfth run: 19 % of a worker's main process was building
Redis clients). The bare chain's declines stop their chain with Ignore, which is not a
failure, so the billiard fix changes nothing there that the bench measures. It carries the
product's patch of Celery's worker state too (common.celery_fixes: a retry stays registered
while it waits), which changes nothing the bench measures (the bare chain never retries).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg
from celery import Celery, chain
from celery.exceptions import Ignore

from common import billiard_fixes, celery_fixes, kombu_fixes  # nothing of Django or the product

from . import sql

kombu_fixes.apply()
billiard_fixes.apply()
celery_fixes.apply()

# The product's worker-side Celery settings (orders_project/settings.py, CELERY_<KEY>), with
# the same environment variables and defaults, so both systems run under the same delivery
# semantics, time limits and broker options. bench/tests/test_bare_settings.py asserts
# they equal the product's, and that every product setting is either here or in NOT_MIRRORED.
_AMQP = os.environ.get("CELERY_BROKER_URL", "").startswith(("amqp://", "amqps://", "pyamqp://"))
_QUEUE_TYPE = os.environ.get("CELERY_QUEUE_TYPE", "quorum" if _AMQP else "classic")
PRODUCT_SETTINGS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "timezone": "UTC",
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "worker_max_memory_per_child": int(os.environ.get("CELERY_WORKER_MAX_MEMORY_PER_CHILD", "200000")),
    "task_ignore_result": True,
    "task_soft_time_limit": int(os.environ.get("CELERY_TASK_SOFT_TIME_LIMIT", "20")),
    "task_time_limit": int(os.environ.get("CELERY_TASK_TIME_LIMIT", "25")),
    "broker_transport_options": {
        "visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "60")),
        "unacked_restore_interval": 2,
        "unacked_restore_throttle": 1,
        # One list per queue, as the product (whose workers then BLMOVE their messages into
        # a delivering list, a guarantee the bare chain does without: kombu_fixes.apply()).
        "priority_steps": [0],
        **({"confirm_publish": True} if _AMQP else {}),
    },
    # The same queues on RabbitMQ: a queue's type is fixed when it is first declared.
    "task_default_queue_type": _QUEUE_TYPE,
    "task_create_missing_queue_type": _QUEUE_TYPE,
    "broker_connection_retry_on_startup": True,
    "task_publish_retry_policy": {"max_retries": 20, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2},
    "worker_send_task_events": True,
    "task_send_sent_event": True,
    "worker_hijack_root_logger": False,
}
# The product's CELERY_* settings this baseline leaves out on purpose, and why.
NOT_MIRRORED = {
    "CELERY_BROKER_URL": "read from the same environment variable below",
    "CELERY_RESULT_BACKEND": "no result backend: the baseline stores no results, not even errors",
    "CELERY_RESULT_EXTENDED": "no result backend",
    "CELERY_RESULT_BACKEND_ALWAYS_RETRY": "no result backend",
    "CELERY_RESULT_BACKEND_MAX_RETRIES": "no result backend",
    "CELERY_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES_MS": "no result backend",
    "CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS": "no result backend",
    "CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED": "no result backend (the saga reads failures from it)",
    "CELERY_VISIBILITY_TIMEOUT": "not a Celery setting: part of broker_transport_options",
    "CELERY_QUEUE_TYPE": "not a Celery setting: read for task_default_queue_type and task_create_missing_queue_type",
    "CELERY_TASK_ROUTES": "other task names, the same queues: TASK_ROUTES below",
    "CELERY_TASK_DEFAULT_QUEUE": "every bare task is routed; the saga queue is not used",
    "CELERY_BEAT_SCHEDULER": "no beat: nothing sweeps",
    "CELERY_BEAT_SCHEDULE": "no beat: nothing sweeps",
    "CELERY_SERVICE": "not a Celery setting: which service's tasks a product worker registers",
    "CELERY_DB_REUSE_MAX": "read by Celery's Django fix-up, which the bare app does not load",
    "CELERY_WORKER_CONSUMER": (
        "reconnects to a broker that went away every second (common.worker_consumer, which reads "
        "Django's settings); no bench restarts a broker, and the consumer's work per message is Celery's"
    ),
}
# Each step on the queue of the service whose database it writes, as the product routes them.
TASK_ROUTES = {
    "bare.reserve": {"queue": "inventory"},
    "bare.release": {"queue": "inventory"},
    "bare.charge": {"queue": "payments"},
    "bare.confirm": {"queue": "orders"},
    "bare.fail": {"queue": "orders"},
    "bare.notify": {"queue": "notifications"},
}
# What a plain Celery user would do about a dropped database connection: retry the task
# (its next run reconnects). Business outcomes are never retried.
RETRY = {
    "autoretry_for": (psycopg.OperationalError,),
    "retry_backoff": 1,
    "retry_backoff_max": 15,
    "retry_jitter": True,
    "max_retries": 5,
}

# No fix-ups: with DJANGO_SETTINGS_MODULE in the environment, Celery's Django fix-up would
# otherwise set Django up in every worker.
app = Celery("bare", fixups=[])
app.conf.update(
    PRODUCT_SETTINGS,
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    result_backend=None,
    task_routes=TASK_ROUTES,
)

_local = threading.local()


def db(service: str) -> psycopg.Connection:
    """This worker process's (or thread's) autocommit connection to `service`'s database:
    opened on first use, reused, replaced once it is closed or broken."""
    connections = _local.__dict__.setdefault("connections", {})
    conn = connections.get(service)
    if conn is None or conn.closed or conn.broken:
        conn = connections[service] = sql.connect(os.environ[sql.DATABASE_URL_VARS[service]])
    return conn


@app.task(name="bare.reserve", **RETRY)
def reserve(order: dict[str, Any]) -> dict[str, Any]:
    if not sql.reserve(db("inventory"), order):
        chain(fail.si(order, sql.OUT_OF_STOCK), notify.si(order, "failed", sql.OUT_OF_STOCK)).apply_async()
        raise Ignore()  # the rest of the happy chain must not run (acks the message)
    return order


@app.task(name="bare.charge", **RETRY)
def charge(order: dict[str, Any]) -> dict[str, Any]:
    if not sql.charge(db("payments"), order):
        chain(release.si(order), fail.si(order, sql.DECLINED), notify.si(order, "failed", sql.DECLINED)).apply_async()
        raise Ignore()
    return order


@app.task(name="bare.confirm", **RETRY)
def confirm(order: dict[str, Any]) -> dict[str, Any]:
    sql.confirm(db("orders"), order)
    return order


@app.task(name="bare.notify", **RETRY)
def notify(order: dict[str, Any], outcome: str, reason: str = sql.DECLINED) -> None:
    sql.notify(db("notifications"), order, outcome, reason)


@app.task(name="bare.release", **RETRY)
def release(order: dict[str, Any]) -> None:
    sql.release(db("inventory"), order)


@app.task(name="bare.fail", **RETRY)
def fail(order: dict[str, Any], reason: str) -> None:
    sql.fail(db("orders"), order, reason)


def submit(order: dict[str, Any]) -> None:
    """Publish the order's chain. Precondition: its order row is committed (sql.insert_order)."""
    chain(reserve.s(order), charge.s(), confirm.s(), notify.s("confirmed")).apply_async()
