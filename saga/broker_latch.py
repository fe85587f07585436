"""Whether this process last found the broker away, and the thread that notices it is back.

A publish that fails because the broker is away has already spent Celery's publish retry
policy on it: 36 s for the first publish over a connection that broke, 6 s for each one
after (measured against a refused port). While the broker stays away,
every publish would spend them again: in the web, each `POST /api/orders/` would hold one
of its threads that long, so a long outage left the web answering about one order a
second. Once a publish has failed that way, this process stops publishing:
each publish is skipped at once and left to the sweeper, as a failed one is
(saga.publish._due_now), and one daemon thread asks the broker every
SAGA_BROKER_PROBE_SECONDS whether it is back. The first answer lets publishing resume.

A short restart never trips it: Celery's retries ride that out and the publish succeeds.
Per process, no shared state: each process finds out for itself, at the cost of one failed
publish. Not pybreaker (payments.resilience uses it for the provider): its breaker holds a
lock for the length of every call, which would make the web's threads publish one at a
time.
"""

import logging
import threading
import time
from collections.abc import Callable

from celery import current_app
from django.conf import settings

logger = logging.getLogger(__name__)


class BrokerLatch:
    """Down from a failed publish until `probe` (raising while the broker is away) returns."""

    def __init__(self, probe: Callable[[], None], interval: Callable[[], float]) -> None:
        self._probe, self._interval = probe, interval
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._watcher: threading.Thread | None = None

    def down(self) -> bool:
        """Whether publishes should be skipped: the broker was away at the last failed
        publish and has not answered since. Lock-free on the usual path."""
        if self._down_since is None:
            return False
        with self._lock:
            # A fork (a prefork pool's child) inherits the state but not the thread.
            self._watch()
            return self._down_since is not None

    def failed(self, error: BaseException) -> None:
        """A publish failed because the broker could not be reached."""
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
                if self._down_since is not None:
                    logger.info(
                        "the broker answers again after %.1f s: publishing resumes", time.monotonic() - self._down_since
                    )
                self._down_since = None
            return


def _broker_answers() -> None:
    """Return if the broker takes a connection now; raise if not (within about 2 s)."""
    with current_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        connection.default_channel  # noqa: B018  # Redis connects (and pings) only here


# This process's: whoever publishes a saga's chain asks it first (saga.publish, saga.sweeper).
LATCH = BrokerLatch(_broker_answers, lambda: settings.SAGA_BROKER_PROBE_SECONDS)
