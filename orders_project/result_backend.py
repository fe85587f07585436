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

import binascii
from types import SimpleNamespace
from typing import Any

from celery import states
from django.db import InterfaceError, OperationalError, connections, router
from django_celery_results.backends.database import DatabaseBackend as _DatabaseBackend
from kombu.exceptions import DecodeError

from common.sql import prepared

# A task's outcomes that end it (celery.states.READY_STATES), in a fixed order for the
# prepared statement's parameters.
FINAL_STATES = sorted(states.READY_STATES)


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

    def _store_result(
        self,
        task_id: str,
        result: Any,
        status: str,
        traceback: str | None = None,
        request: Any = None,
        using: str | None = None,
    ) -> Any:
        """Store a task's outcome as one upsert by task id, one round trip.

        django-celery-results' own store is `get_or_create` (a read, then an insert in a
        transaction of its own, then maybe an update): three statements and two commits on
        every stored result, and a chain's last step stores one per saga (saga.engine).
        Same columns and encoding as the original.

        Unlike the original, the last write does not always win: a stored SUCCESS is never
        replaced, and a stored FAILURE or REVOKED only by another final state (what
        Celery's Elasticsearch backend does, celery/celery#6115). `Task.retry` publishes
        the next attempt before its worker stores RETRY, so with a short countdown the next
        attempt can fail for good, store FAILURE and send its failure report first; the
        late RETRY then hid that failure, and the coordinator ignored the report as one
        with no stored failure (saga.failure) until the sweeper found the step stalled.
        """
        content_type, content_encoding, encoded = self.encode_content(result)
        meta = {**self._get_meta_from_request(request), "children": self.current_task_children(request)}
        _, _, encoded_meta = self.encode_content(meta)
        fields = {
            "status": status,
            "result": encoded,
            "traceback": traceback,
            "meta": encoded_meta,
            "content_encoding": content_encoding,
            "content_type": content_type,
            **self._get_extended_properties(request, traceback),
        }
        fields["traceback"] = fields["traceback"] if fields["traceback"] is not None else traceback
        names = list(fields)
        started = ", date_started" if status == states.STARTED else ""
        alias = using or router.db_for_write(self.TaskModel)
        table = connections[alias].ops.quote_name(self.TaskModel._meta.db_table)
        with prepared(alias) as cursor:  # a chain's record per saga: parsed and planned once
            cursor.execute(
                f"INSERT INTO {table} (task_id, {', '.join(names)}, date_created, date_done{started}) "
                f"VALUES (%s, {', '.join(['%s'] * len(names))}, now(), now(){', now()' if started else ''}) "
                f"ON CONFLICT (task_id) DO UPDATE SET {', '.join(f'{n} = EXCLUDED.{n}' for n in names)}, "
                f"date_done = EXCLUDED.date_done{', date_started = EXCLUDED.date_started' if started else ''} "
                f"WHERE {table}.status <> %s AND ({table}.status <> ALL(%s) OR EXCLUDED.status = ANY(%s))",
                [task_id, *fields.values(), states.SUCCESS, FINAL_STATES, FINAL_STATES],
            )
        return encoded

    def _fail_chain(
        self,
        chain: Any,
        exc: BaseException,
        traceback: str | None = None,
        store_result: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        """Store no failure for the tasks chained after a failed one.

        Celery marks each of them failed too (one upsert per task left in the chain: two
        more writes for every declined card), for whoever waits on the chain's last result.
        Nobody here does: the coordinator reads the failed step's own result, which is still
        stored, and its failure report says where the chain stopped (saga.failure). What
        Celery does for a chord member among them (its part returned) still happens.
        """
        super()._fail_chain(chain, exc, traceback, store_result=False, state=state)

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        """A task's stored outcome, as django-celery-results returns it, read in one
        prepared statement: its own read goes through the ORM (a model instance, then a
        dict of it), a millisecond and more of the coordinator's CPU for every failed
        step it reads (saga.failure), on that saga's way to its compensations."""
        alias = router.db_for_read(self.TaskModel)
        table = connections[alias].ops.quote_name(self.TaskModel._meta.db_table)
        with prepared(alias) as cursor:
            cursor.execute(
                "SELECT task_name, task_args, task_kwargs, status, result, date_done, traceback, meta, worker, "
                f"content_encoding FROM {table} WHERE task_id = %s",
                [task_id],
            )
            row = cursor.fetchone()
        if row is None:
            return super()._get_task_meta_for(task_id)  # what it says of a task it never stored
        task_name, task_args, task_kwargs, status, result, date_done, traceback, meta, worker, encoding = row
        obj = SimpleNamespace(content_encoding=encoding)
        res = {
            "task_id": task_id,
            "task_name": task_name,
            "status": status,
            "date_done": date_done,
            "traceback": traceback,
            "worker": worker,
        }
        meta = self.decode_content(obj, meta) or {}
        result = self.decode_content(obj, result)
        try:
            task_args = self.decode_content(obj, task_args)
            task_kwargs = self.decode_content(obj, task_kwargs)
        except (DecodeError, binascii.Error):
            pass
        res.update(
            meta,
            result=result,
            task_args=task_args,
            task_kwargs=task_kwargs,
            args=task_args,
            kwargs=task_kwargs,
        )
        return self.meta_from_decoded(res)
