"""Celery beat's scheduler: django-celery-beat's, asking the database about changes at
most once a second.

django-celery-beat's `DatabaseScheduler` reads its change marker (`PeriodicTasks`) on
every access to its schedule, and Celery beat reads the schedule on every tick. Over the
last 10 ms before an entry is due, beat ticks without sleeping (celery.beat.Scheduler.adjust
takes 10 ms off each sleep, and a sleep of zero or less is skipped), so each sweep
(every SAGA_SWEEP_INTERVAL seconds) cost about 25 queries in a burst, around the clock:
`make run` left idle made 461 transactions on the `default` database in 40 s with it, 48
with this one, about a million a day fewer (BENCHMARKS.md, eighteenth run). A change to
the stored schedule (made with beat's database role; the admin only shows it) still
reaches beat: at most CHANGE_CHECK_SECONDS later. It also outlives a database restart
(`tick`).
"""

import contextlib
import logging
import time
from typing import Any

from django.db import DatabaseError, InterfaceError, connections
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger(__name__)

# How often beat asks the database whether its schedule changed.
CHANGE_CHECK_SECONDS = 1.0
# How long beat waits before it tries again when the database did not answer a tick.
DATABASE_RETRY_SECONDS = 1.0


class ThrottledDatabaseScheduler(DatabaseScheduler):
    """`DatabaseScheduler`, reading its change marker at most every CHANGE_CHECK_SECONDS.

    A change is never lost, only seen later: the marker is a timestamp that the next read
    compares with the last one it saw (DatabaseScheduler.schedule_changed)."""

    _change_checked_at: float | None = None

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Beat's tick, which outlives a database that goes away: django-celery-beat
        catches a database error in `schedule_changed` and `sync`, but not in the schedule's
        re-read that follows them, and Celery's beat service ends on any exception from a
        tick. A restart of PostgreSQL at that moment stopped beat for good, and with it every
        sweep (no drain, no recovery) until someone restarted it. Instead, the connections
        are dropped (the next query opens a new one), the whole schedule is read again once
        the database answers, and the tick is tried again DATABASE_RETRY_SECONDS later."""
        try:
            return float(super().tick(*args, **kwargs))
        except (DatabaseError, InterfaceError) as error:
            logger.warning(
                "beat: the database did not answer (%s); trying again in %.0f s", error, DATABASE_RETRY_SECONDS
            )
            for connection in connections.all(initialized_only=True):
                with contextlib.suppress(DatabaseError, InterfaceError):
                    connection.close()
            self._initial_read = True  # the re-read that failed may have consumed a change
            return DATABASE_RETRY_SECONDS

    def schedule_changed(self) -> bool:
        now = time.monotonic()
        if self._change_checked_at is not None and now - self._change_checked_at < CHANGE_CHECK_SECONDS:
            return False
        self._change_checked_at = now
        return bool(super().schedule_changed())
