"""The Celery result backend: django-celery-results' database backend, made to ride out a
connection that PostgreSQL closed (a restart, a failover, a proxy's idle timeout).

Celery retries a result backend's write or read when `result_backend_always_retry` is
on and the backend calls the error safe to retry (`celery.backends.base._ensure_retryable`).
django-celery-results (2.6) calls safe only `InterfaceError`, what psycopg 2 raised on a
closed connection; psycopg 3 raises `OperationalError` ("the connection is closed",
"server closed the connection unexpectedly"), so a worker whose `default` connection died
failed to store a task's outcome: a step's failure, which the coordinator reads from here,
was lost or stored as that `OperationalError` instead (issue 15).
"""

from django.db import InterfaceError, OperationalError, connections, router
from django_celery_results.backends.database import DatabaseBackend as _DatabaseBackend


class DatabaseBackend(_DatabaseBackend):
    def _aliases(self) -> set[str]:
        return {router.db_for_write(self.TaskModel), router.db_for_read(self.TaskModel)}

    def exception_safe_to_retry(self, exc: Exception) -> bool:
        """A connection-level error, outside a transaction: safe, because every write here
        is an upsert by task id. Inside an atomic block (an eager task in a test) the
        connection belongs to the caller's transaction and is not ours to replace."""
        if not isinstance(exc, (OperationalError, InterfaceError)):
            return False
        return not any(connections[alias].in_atomic_block for alias in self._aliases())

    def on_backend_retryable_error(self, exc: Exception) -> None:
        # Django opens a new connection on the next query; the dead one would fail again.
        for alias in self._aliases():
            connections[alias].close()
