"""Celery's worker consumer, reconnecting to a broker that went away every
BROKER_RECONNECT_SECONDS instead of ever more slowly.

Celery's consumer reconnects on kombu's default schedule: 2, 4, 6, ... s between attempts,
up to 30 s, and no setting changes it (`broker_connection_max_retries` counts attempts
only). So a broker that is back 7 s after it went is found at the attempt 12 s after:
`make chaos` on RabbitMQ, whose restart takes 6 to 8 s, had each worker's consumer
reconnect 5 s after the broker answered again, and a saga caught by the restart waited
that out at each hop whose worker was still asleep (BENCHMARKS.md, "Chaos"). After an
outage of a minute the wait reaches 30 s. A refused connect costs the broker nothing, so
each consumer tries every BROKER_RECONNECT_SECONDS. It gives up after as long as
Celery's schedule would have (`broker_connection_max_retries` attempts at kombu's
intervals: about 46 minutes at the default 100), and it logs the first failure and then
one line every QUIET_SECONDS, not one per attempt.

Named by CELERY_WORKER_CONSUMER (settings); beat and the web have no consumer, and their
publishes have their own policy (CELERY_TASK_PUBLISH_RETRY_POLICY, saga.publish).
"""

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from django.conf import settings

# kombu.Connection.ensure_connection's defaults, which Celery's consumer leaves as they are.
KOMBU_INTERVAL_START, KOMBU_INTERVAL_STEP, KOMBU_INTERVAL_MAX = 2.0, 2.0, 30.0
QUIET_SECONDS = 30.0


def kombu_patience(max_retries: int) -> float:
    """Seconds kombu's default schedule waits over `max_retries` failed attempts."""
    return sum(min(KOMBU_INTERVAL_START + i * KOMBU_INTERVAL_STEP, KOMBU_INTERVAL_MAX) for i in range(max_retries))


class _Quiet:
    """Celery's reconnect errback (it logs each failure), called for the first failure and
    then at most once every QUIET_SECONDS."""

    def __init__(self, errback: Callable[[BaseException, float], Any] | None) -> None:
        self.errback, self.last = errback, -float("inf")

    def __call__(self, exc: BaseException, interval: float) -> None:
        now = time.monotonic()
        if self.errback is not None and now - self.last >= QUIET_SECONDS:
            self.last = now
            self.errback(exc, interval)


def _ensure_connection(
    ensure: Callable[..., Any],
    errback: Callable[[BaseException, float], Any] | None = None,
    max_retries: int | None = None,
    **options: Any,
) -> Any:
    """kombu's `Connection.ensure_connection` as Celery's consumer calls it, every
    BROKER_RECONNECT_SECONDS for as long as Celery's own schedule would have tried."""
    interval = settings.BROKER_RECONNECT_SECONDS
    if max_retries:  # 0 and None keep their meaning in Celery and kombu
        options.setdefault("timeout", kombu_patience(max_retries))
        max_retries = None
    options.update(interval_start=interval, interval_step=0, interval_max=interval)
    return ensure(_Quiet(errback), max_retries, **options)


class Consumer(CeleryConsumer):
    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) on the
        # connection it made for this attempt: the instance's method is replaced, not
        # kombu's class.
        conn.ensure_connection = partial(_ensure_connection, conn.ensure_connection)
        return super().ensure_connected(conn)
