"""Drop the database connections PostgreSQL has closed, before a task or a request uses them.

A restart, a failover, an admin's pg_terminate_backend or idle_session_timeout closes a
kept connection (CONN_MAX_AGE). PostgreSQL says so on the connection itself: it sends a
FATAL notice and closes its end, so the idle socket turns readable. Asking the socket is
one poll() per open connection and no round trip; Django's CONN_HEALTH_CHECKS would be a
`SELECT 1` per connection per request or task (issue 15, BENCHMARKS.md). A connection cut
without a word (a network partition) is still found by the first query that uses it: a
task retries (common.steps, saga.tasks), the result backend retries its write
(orders_project.result_backend), and a request fails once, after which Django closes it.
"""

import contextlib
import select
from typing import Any


def close_connections_closed_by_server(**_: Any) -> None:
    """Close every kept connection the server has closed. Not inside a transaction."""
    from django.db import DatabaseError, connections

    for connection in connections.all(initialized_only=True):
        if connection.connection is None or connection.in_atomic_block:
            continue
        if closed_by_server(connection.connection):
            with contextlib.suppress(DatabaseError):
                connection.close()


def closed_by_server(raw: Any) -> bool:
    """Whether the server has spoken on an idle connection. Between queries it has nothing
    to say unless it is closing the session (no LISTEN here, no asynchronous notices)."""
    try:
        fd = raw.fileno()
    except Exception:  # psycopg: "the connection is lost"
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # POLLHUP and POLLERR are always reported
    return bool(poller.poll(0))
