"""Whether this process found the broker away, and the thread that notices it is back.

A publish of a saga's chain retries a broker that is away for SAGA_PUBLISH_RIDE_OUT_SECONDS
(saga.publish._RideOut), where Celery's own policy retries for 36 s after a connection
broke. Every thread publishing meanwhile would wait as long: in the web, each
`POST /api/orders/` held a thread, and a long outage left the web answering about one
order a second. So once a publish has failed for SAGA_BROKER_PROBE_SECONDS, or given up,
this latch goes down: each publish of the process is skipped at once and left to the
sweeper (saga.publish._due_now, `never_sent`), and one daemon thread asks the broker every
SAGA_BROKER_PROBE_SECONDS whether it is back. The latch comes up when the probe connects,
or when a publish that rode the outage out goes through.

Per process, no shared state: the shared state would live on the broker that is away. Not
pybreaker (payments.resilience uses it for the provider): its breaker holds a lock for the
length of every call, which would make the web's threads publish one at a time.
"""

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial

from celery import current_app
from django.conf import settings

logger = logging.getLogger(__name__)


class BrokerLatch:
    """Down from a failing publish until `probe` (raising while the broker is away) returns,
    or a publish goes through."""

    def __init__(self, probe: Callable[[], None], interval: Callable[[], float]) -> None:
        self._probe, self._interval = probe, interval
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._watcher: threading.Thread | None = None
        # A fork copies the lock as it is: held, if the probe thread was marking the latch
        # up at that instant, and then never released in the child, whose first look would
        # hang for good (billiard forks a new pool process whenever one is replaced).
        os.register_at_fork(after_in_child=partial(_after_fork, weakref.ref(self)))

    def down(self) -> bool:
        """Whether publishes should be skipped: a publish found the broker away and it has
        not answered since. Lock-free on the usual path."""
        if self._down_since is None:
            return False
        with self._lock:
            # A fork (a prefork pool's child) inherits the state but not the thread.
            self._watch()
            return self._down_since is not None

    def failed(self, error: BaseException) -> None:
        """A publish failed because the broker could not be reached, or has been failing
        for a while (saga.publish._RideOut)."""
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                logger.warning(
                    "the broker is away (%s: %s): until it answers again, this process publishes no chain "
                    "and leaves them to the sweeper",
                    type(error).__name__,
                    error,
                )
            self._watch()

    def heard(self) -> None:
        """A publish went through: the broker answers (no need to wait for the probe)."""
        with self._lock:
            self._up()

    def _up(self) -> None:
        """Holds `_lock`."""
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            logger.info("the broker answers again after %.1f s: publishing resumes", away)
        self._down_since = None

    def _watch(self) -> None:
        """Start the thread that waits for the broker, unless it runs. Holds `_lock`."""
        if self._down_since is not None and not (self._watcher and self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._wait_for_broker, name="broker-latch", daemon=True)
            self._watcher.start()

    def _wait_for_broker(self) -> None:
        while True:
            time.sleep(self._interval())
            try:
                self._probe()
            except Exception:
                continue
            with self._lock:
                self._up()
            return


def _after_fork(latch: "weakref.ref[BrokerLatch]") -> None:
    if (copy := latch()) is not None:
        copy._lock = threading.Lock()
        copy._watcher = None


def _broker_answers() -> None:
    """Return if the broker takes a connection now; raise if not (within about 2 s)."""
    with current_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        connection.default_channel  # noqa: B018  # Redis connects (and pings) only here


# This process's: whoever publishes a saga's chain asks it first (saga.publish, saga.sweeper).
LATCH = BrokerLatch(_broker_answers, lambda: settings.SAGA_BROKER_PROBE_SECONDS)
