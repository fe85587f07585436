"""SQL that several services' databases share.

`saga_step_abort(reason)` lets one statement undo itself: a step that does its key, its
checks and its effect in a single statement (no BEGIN, no COMMIT: one round trip) calls it
where a check fails, and the error rolls the whole statement back, key included. The step
then takes its general path, which finds out why under its lock and says so.
"""

from django.db import DatabaseError, migrations

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
