"""SQL that several services' databases share.

`prepared(using)` runs the statements every saga step sends as prepared statements (or,
for those whose plan depends on how large their tables are, bound server-side and planned
at every execution).

`saga_step_abort(reason)` lets one statement undo itself: a step that does its key, its
checks and its effect in a single statement (no BEGIN, no COMMIT: one round trip) calls it
where a check fails, and the error rolls the whole statement back, key included. The step
then takes its general path, which finds out why under its lock and says so.
"""

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from django.db import DatabaseError, connections, migrations

STEP_ABORT_SQLSTATE = "P0001"  # raise_exception

STEP_ABORT_FUNCTION = migrations.RunSQL(
    sql=(
        "CREATE OR REPLACE FUNCTION saga_step_abort(reason text) RETURNS boolean "
        "LANGUAGE plpgsql VOLATILE AS $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = reason; END $$"
    ),
    reverse_sql="DROP FUNCTION IF EXISTS saga_step_abort(text)",
)


def is_step_abort(error: DatabaseError) -> bool:
    """Whether `error` is a statement's own `saga_step_abort`."""
    return getattr(error.__cause__, "sqlstate", None) == STEP_ABORT_SQLSTATE


class PreparedCursor:
    """A server-side-binding psycopg cursor whose statements are prepared on first use
    (with `plan_once` False: sent with their parameters and planned at every execution)."""

    def __init__(self, cursor: psycopg.Cursor, *, plan_once: bool = True) -> None:
        self._cursor = cursor
        self._prepare = plan_once

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._cursor.execute(sql, params, prepare=self._prepare)

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    @property
    def description(self) -> Any:
        return self._cursor.description


@contextlib.contextmanager
def prepared(using: str, *, plan_once: bool = True) -> Iterator[PreparedCursor]:
    """A cursor on `using`'s connection whose statements PostgreSQL parses once per
    connection, not on every execution: the hot path's statements are long (a key, checks
    and an effect in one) and run once per saga, where Django's cursor binds parameters on
    the client and sends each as new text. Errors are Django's, as from its own cursor.

    A prepared statement's plan is PostgreSQL's choice: after five executions it may keep
    one generic plan for the connection's life, made from the table statistics of that
    moment. That suits a statement that finds its rows by a unique key whatever the
    table's size. It does not suit one that joins or locks by a key array on tables that
    grow: on tables that were new or small when the connection planned it, the generic plan
    scans them whole, and keeps scanning as they grow, until an ANALYZE happens to
    invalidate it (the saga store's locked read went from 0.45 to 17 ms a call in one
    bench phase: BENCHMARKS.md). Such statements pass `plan_once=False`: sent with their
    parameters (still bound server-side, typed) and planned for those values at every
    execution, about 0.1 to 0.3 ms, against a stale plan's whole-table scans.
    Precondition: the statement's placeholders are typed where PostgreSQL cannot infer them.
    """
    connection = connections[using]
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        yield PreparedCursor(cursor, plan_once=plan_once)
