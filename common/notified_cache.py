"""Process-local caches of a few hot rows, emptied by PostgreSQL's NOTIFY on every change.

The web reads two things on every order it places that almost never change: the API
token with its user, and the catalogue's prices. Each was a transaction of its own (two of
the saga's twelve: BENCHMARKS.md). Here a process keeps what it read, and one connection
per database LISTENs on a channel that the tables' triggers NOTIFY (in the migration that
creates them: `notify_trigger`) when a row that could be cached changes: any writer, the
ORM's `update()` and plain SQL included, empties the cache of every process when its
transaction commits.

When an entry can be trusted, and when the cache is passed by:
- Only while the process's listener is connected, listening, and has heard its own probe
  (a notification it sends itself, before it goes live and after every quiet spell).
  Until then, after it lost its connection, and while it reconnects, every read goes to
  the database. Emptying the cache and counting a generation is all a notification or a
  lost connection does.
- A read fills the cache only if no notification came between the moment it looked
  (`lookup`: a ticket with the generation) and the moment it fills (`fill`): a read that
  began before a commit cannot store what that commit replaced after its notification.
  What is left is the time a notification takes to arrive (milliseconds), the same window
  as a read that raced the commit itself.
- Never inside a transaction (`in_atomic_block`): a transaction must see its own writes,
  which no other process has been notified of, and its own snapshot.
- A lost connection is found by the probe, TCP keepalives and a user timeout (within
  about 20 s on a silent network; a server restart closes it at once). Entries older than
  `max_age` are dropped as well, which bounds the staleness if the listener hangs
  undetected.

Notifications carry no meaning but "empty the cache", so any role that can NOTIFY (all of
them can) can cost reads; none can put a row in the cache (docs/SECURITY.md for what a
role that LISTENs and never reads can deny).
"""

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from django.conf import settings
from django.db import connections, migrations

log = logging.getLogger(__name__)

# How long the listener waits before it connects again after losing its connection.
_RECONNECT_SECONDS = (0.2, 1.0, 5.0)
# How long one wait for notifications lasts. After a quiet one the listener has a probe
# sent to itself from a second connection and expects it back within _PROBE_SECONDS, or it
# reconnects: a probe that returns proves that another session's notifications reach it,
# which a `SELECT 1` would not behind a pooler in transaction mode (where LISTEN stays on
# a server connection the client let go of). Not from the listening connection itself: a
# session's own notification comes back to it even there, when the pooler happens to hand
# it the server connection that holds the LISTEN.
_POLL_SECONDS = 5.0
_PROBE_SECONDS = 5.0
_PROBE = "probe:"  # a payload that empties nothing (the triggers' is empty)
# A connection that a silent network cut is found: by keepalives while idle, and by the
# user timeout while a probe is unacknowledged (keepalives are not sent then), in about 20 s.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
    "tcp_user_timeout": 20_000,
}


def notify_trigger_sql(
    *, table: str, channel: str, columns: Iterable[str] | None, name: str, ignoring: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """The statements that create, and those that drop, triggers on `table` that NOTIFY
    `channel` (once per transaction, however many rows) when a row is deleted, when the
    table is truncated, and when a row is updated (with `columns`: only when one of them
    changes, so that updates of other columns, the stock a reservation takes, cost
    nothing; without `columns`, when any column but those `ignoring` changes). Inserts need
    no notification: a cache holds no absent row."""
    function = f"{name}_notify"
    columns = list(columns or [])
    of_columns = f" OF {', '.join(columns)}" if columns else ""
    if columns:
        when = " WHEN ({})".format(" OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns))
    else:
        rest = "".join(f" - '{c}'" for c in ignoring)
        when = f" WHEN ((to_jsonb(OLD){rest}) IS DISTINCT FROM (to_jsonb(NEW){rest}))"
    create = [
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{channel}', ''); RETURN NULL; END $$",
        f"CREATE TRIGGER {name}_update AFTER UPDATE{of_columns} ON {table} "
        f"FOR EACH ROW{when} EXECUTE FUNCTION {function}()",
        # Per row: a DELETE that deletes nothing (a new token's sweep of expired ones) empties no cache.
        f"CREATE TRIGGER {name}_delete AFTER DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER {name}_truncate AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
    ]
    drop = [f"DROP TRIGGER IF EXISTS {name}_{event} ON {table}" for event in ("update", "delete", "truncate")]
    return create, [*drop, f"DROP FUNCTION IF EXISTS {function}()"]


def notify_trigger(*, table: str, channel: str, columns: Iterable[str] | None, name: str) -> migrations.RunSQL:
    """A migration operation: `notify_trigger_sql`'s triggers."""
    create, drop = notify_trigger_sql(table=table, channel=channel, columns=columns, name=name)
    return migrations.RunSQL(sql=tuple(create), reverse_sql=tuple(drop))


_CACHES: "list[NotifiedCache]" = []


def stop_listeners() -> None:
    """Stop every cache's listener in this process: before the database it listens to is
    stopped (a script that started an embedded server), so that its loss is not reported."""
    for cache in _CACHES:
        cache.stop()


@dataclass(frozen=True)
class Ticket:
    """What `lookup` saw: the generation a later `fill` must still find."""

    generation: int


class NotifiedCache:
    """Rows of database `alias` by key, kept while no notification on `channel` says they
    may have changed (module docstring). Thread-safe; one listener thread per process,
    started by the first lookup.
    """

    def __init__(
        self,
        *,
        alias: str,
        channel: str,
        max_entries: int = 10_000,
        max_age: float = 300.0,
        poll_seconds: float = _POLL_SECONDS,
        probe_seconds: float = _PROBE_SECONDS,
        connect: Callable[[str, str], psycopg.Connection] | None = None,
    ) -> None:
        self.alias = alias
        self.channel = channel
        self.max_entries = max_entries
        self.max_age = max_age
        self.poll_seconds = poll_seconds
        self.probe_seconds = probe_seconds
        # How the listener connects (alias, channel): tests give a connection of their own.
        self.connect = connect or listen_connection
        self._lock = threading.Lock()
        self._entries: dict[Any, tuple[float, Any]] = {}
        self._generation = 0
        self._live = False
        self._listener: _Listener | None = None
        # How many times a listener of this process started listening (tests, operators).
        self.listens = 0
        _CACHES.append(self)

    @property
    def live(self) -> bool:
        """Whether the listener is listening: only then is anything cached."""
        return self._live

    def lookup(self, keys: Iterable[Any]) -> tuple[dict[Any, Any], Ticket | None]:
        """The cached rows among `keys`, and the ticket to `fill` the others with; no rows
        and no ticket when the cache cannot be used here and now (module docstring)."""
        if not settings.NOTIFIED_CACHES or connections[self.alias].in_atomic_block:
            return {}, None
        self._ensure_listener()
        now = time.monotonic()
        with self._lock:
            if not self._live:
                return {}, None
            found = {}
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and now - entry[0] < self.max_age:
                    found[key] = entry[1]
            return found, Ticket(self._generation)

    def get_many(self, keys: Iterable[Any], read: Callable[[list[Any]], dict[Any, Any]]) -> dict[Any, Any]:
        """The rows of `keys` that exist: the cached ones, and the others as `read(missing)`
        returns them from the database (by key; an absent row is simply left out), kept
        for the next reads. The ticket is taken before `read` runs (module docstring)."""
        keys = list(keys)
        rows, ticket = self.lookup(keys)
        if missing := [key for key in keys if key not in rows]:
            fetched = read(missing)
            self.fill(ticket, fetched)
            rows.update(fetched)
        return rows

    def fill(self, ticket: Ticket | None, rows: dict[Any, Any]) -> bool:
        """Keep `rows` (read from the database after `lookup` gave `ticket`) unless a
        notification or a lost connection came since; whether they were kept."""
        if ticket is None or not rows:
            return False
        now = time.monotonic()
        with self._lock:
            if not self._live or self._generation != ticket.generation:
                return False
            if len(self._entries) + len(rows) > self.max_entries:
                self._entries.clear()
            for key, row in rows.items():
                self._entries[key] = (now, row)
            return True

    def clear(self) -> None:
        """Forget every row (a notification: something changed), and start a generation
        so that no read begun before this fills the cache."""
        self._listening(None, None)

    def stop(self) -> None:
        """Stop this process's listener (tests; a process that exits needs nothing)."""
        with self._lock:
            listener, self._listener = self._listener, None
            self._entries.clear()
            self._generation += 1
            self._live = False
        if listener is not None:
            listener.stop()

    def _listening(self, listener: "_Listener | None", live: bool | None) -> None:
        """`clear`, and with `live`, whether `listener` listens from now on: only the
        process's current listener says so (one that was stopped may still be winding down)."""
        with self._lock:
            self._entries.clear()
            self._generation += 1
            if live is not None and listener is self._listener:
                self._live = live
                if live:
                    self.listens += 1

    def _ensure_listener(self) -> None:
        listener = self._listener
        if listener is not None and listener.pid == os.getpid():
            return
        with self._lock:
            if self._listener is not None and self._listener.pid == os.getpid():
                return
            # None yet, or inherited from the process this one was forked from, whose
            # thread did not come along: what it cached is not this process's to trust.
            self._entries.clear()
            self._generation += 1
            self._live = False
            self._listener = _Listener(self, connect=lambda: self.connect(self.alias, self.channel))
            self._listener.start()


def listen_connection(alias: str, channel: str) -> psycopg.Connection:
    """A connection of its own to `alias` (the same server, database and role as the
    process's), in autocommit, with keepalives, named for `channel` and this process."""
    params = connections[alias].get_connection_params()
    for django_only in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(django_only, None)
    # Named, so that an operator sees in pg_stat_activity what the idle session is.
    params = {**_KEEPALIVES, **params, "application_name": f"cache listener: {channel} (pid {os.getpid()})"}
    return psycopg.connect(**params, autocommit=True)


class _Listener:
    """The thread that LISTENs for one cache and empties it on every notification."""

    def __init__(self, cache: NotifiedCache, *, connect: Callable[[], psycopg.Connection]) -> None:
        self.cache = cache
        self.pid = os.getpid()
        self._connect = connect
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{cache.channel}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop, without waiting for it: it ends with its current wait
        (at most the cache's poll_seconds), or as soon as its connection is closed, silently. What
        it does until then no longer reaches the cache (NotifiedCache._listening)."""
        self._stopped.set()

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                with self._connect() as connection, self._connect() as prober:
                    connection.execute(f"LISTEN {self.cache.channel}")
                    # Listening from here on (whatever commits later is notified), once
                    # a probe shows that other sessions' notifications reach this one.
                    self._probe(connection, prober)
                    self.cache._listening(self, True)
                    failures = 0
                    self._listen(connection, prober)
            except Exception as error:  # whatever it was, the cache is off until the listener is back
                if not self._stopped.is_set():
                    log.warning(
                        "cache listener on %s lost (%s); reading the database until it is back",
                        self.cache.channel,
                        type(error).__name__,
                    )
                failures += 1
            finally:
                self.cache._listening(self, False)
            self._stopped.wait(_RECONNECT_SECONDS[min(failures, len(_RECONNECT_SECONDS)) - 1] if failures else 0)

    def _listen(self, connection: psycopg.Connection, prober: psycopg.Connection) -> None:
        while not self._stopped.is_set():
            if not self._receive(connection, self.cache.poll_seconds, probe=None):
                # A quiet spell: make sure that notifications still reach this connection.
                self._probe(connection, prober)

    def _probe(self, connection: psycopg.Connection, prober: psycopg.Connection) -> None:
        """Notify this listener's channel from `prober` with a payload of its own, and
        raise unless it reaches `connection` within the cache's probe_seconds."""
        probe = f"{_PROBE}{secrets.token_hex(8)}"
        prober.execute("SELECT pg_notify(%s, %s)", [self.cache.channel, probe])
        if not self._receive(connection, self.cache.probe_seconds, probe=probe):
            raise TimeoutError("the listener's probe did not come back")

    def _receive(self, connection: psycopg.Connection, timeout: float, *, probe: str | None) -> bool:
        """Empty the cache on each notification for `timeout` seconds, or until `probe`
        comes; whether one came (with `probe`: whether the probe did).

        Each wait ends on its own (`stop_after`), never by leaving the loop early: psycopg
        drops the notifications of the same read that a closed generator had not yet
        yielded, and one of them could be a change."""
        deadline = time.monotonic() + timeout
        came = heard = False
        while not heard and (left := deadline - time.monotonic()) > 0:
            for notification in connection.notifies(timeout=left, stop_after=1):
                if not notification.payload.startswith(_PROBE):
                    self.cache.clear()
                    came = True
                elif notification.payload == probe:
                    heard = True
        return heard if probe is not None else came
