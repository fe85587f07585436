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

**What it held and had not started goes back to its queue once it is connected again**
(Redis). When the connection breaks, Celery drops the messages the worker had taken but not
started: those waiting for a free pool process and those held for later (a retry's
countdown, an ETA), since their delivery tags belong to the old channel. kombu then tries
to put them back on their queues, but through the broken connection: while the broker is
away (a restart) that fails, and they stay in Redis's unacknowledged hash, where only the
workers' watchdog (saga.recovery, a few seconds after the broker is back, and two looks
apart) or the visibility timeout (60 s) finds them. This consumer notes their delivery
tags when the connection breaks and, once connected again, returns them to their queues
itself, through the same transaction as every other restore (common.kombu_fixes), so a
message is returned once whoever returns it. A request Celery kept (a task running) is
left alone: its acknowledgement comes when it ends. Two kinds may run twice, as they would
when the watchdog returned them: a message a prefork pool process had been handed but not
yet started, and one whose task ended while the broker was away, its acknowledgement
failing. Every step is safe with copies.

Named by CELERY_WORKER_CONSUMER (settings); beat and the web have no consumer, and their
publishes have their own policy (CELERY_TASK_PUBLISH_RETRY_POLICY, saga.publish).
"""

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.state import reserved_requests
from django.conf import settings

from common.kombu_fixes import unacked_restore

logger = logging.getLogger(__name__)

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


def unacked_tags(connection: Any) -> tuple[str, ...]:
    """The delivery tags of what the connection's consumer took and has not acknowledged
    (its default channel's, which Celery's task consumer uses); none but on Redis, whose
    unacknowledged messages stay unacknowledged when a connection breaks (RabbitMQ
    requeues them itself). Reads only this process's memory: safe on a broken connection."""
    if connection is None or getattr(connection.transport, "driver_type", None) != "redis":
        return ()
    qos = getattr(getattr(connection, "_default_channel", None), "_qos", None)
    return tuple(qos._delivered) if qos is not None else ()


def dropped_return(connection: Any, tags: tuple[str, ...]) -> int:
    """Return the unacknowledged deliveries `tags` to the heads of their queues over a
    connection of their own, cloned from `connection` (connected); how many were still
    unacknowledged (the watchdog may have returned some first). Precondition: nothing in
    this process will acknowledge them (Celery dropped their requests)."""
    with connection.clone() as own:
        channel = own.default_channel
        return sum(unacked_restore(channel, channel.client, tag) for tag in tags)


class Consumer(CeleryConsumer):
    # Delivery tags: unacknowledged when the connection broke; of those, what Celery dropped.
    _unacked_at_loss: tuple[str, ...] = ()
    _dropped: tuple[str, ...] = ()

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        # Before Celery closes the connection, whose channel forgets what it delivered.
        self._unacked_at_loss = unacked_tags(self.connection)
        super().on_connection_error_after_connected(exc)

    def on_close(self) -> None:
        super().on_close()
        # Celery keeps the requests that are running (it will acknowledge them when they
        # end) and forgets the rest, which nobody in this process will acknowledge.
        kept = {request.message.delivery_tag for request in reserved_requests}
        self._dropped = tuple(tag for tag in self._unacked_at_loss if tag not in kept)
        self._unacked_at_loss = ()

    def ensure_connected(self, conn: Any) -> Any:
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) on the
        # connection it made for this attempt: the instance's method is replaced, not
        # kombu's class.
        conn.ensure_connection = partial(_ensure_connection, conn.ensure_connection)
        conn = super().ensure_connected(conn)
        if self._dropped:
            dropped, self._dropped = self._dropped, ()
            try:
                returned = dropped_return(conn, dropped)
            except Exception as error:  # the broker went again: the watchdog returns them
                logger.warning("could not return %d dropped message(s) to their queues: %r", len(dropped), error)
            else:
                # None returned: kombu's own restore could reach the broker (a connection
                # error with the broker up), or the watchdog was first.
                logger.log(
                    logging.WARNING if returned else logging.DEBUG,
                    "returned %d of %d message(s) this worker held but had not started when its broker "
                    "connection broke",
                    returned,
                    len(dropped),
                )
        return conn
