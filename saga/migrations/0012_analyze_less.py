from django.db import migrations

# Columns no query filters, joins or sorts on: their statistics guide no plan. ANALYZE
# computes the rest (the keys, the phase and position, the status, the deadline, and the
# start and worker the store's statements test).
STEP_COLUMNS = (
    "result",
    "celery_task_id",
    "last_error",
    "task_name",
    "queued_at",
    "finished_at",
    "attempts",
    "republished",
)
SAGA_COLUMNS = ("context", "trace_context", "failure_reason")


def _statistics(table: str, columns: tuple[str, ...], target: int) -> str:
    return f"ALTER TABLE {table} " + ", ".join(f"ALTER COLUMN {c} SET STATISTICS {target}" for c in columns)


class Migration(migrations.Migration):
    """ANALYZE skips the saga store's columns that no plan reads.

    Autovacuum analyzes the step table whenever a tenth of it changed, which on a growing
    table (a new deployment, `make run`, every bench) is every naptime, and each ANALYZE
    sorted every sampled row's JSON result and task id: 66 to 74 ms of CPU a time on 10,000
    steps, 16 to 24 ms without them; the saga table's context 10 to 13 ms, 6 without. Slow
    orders were in flight during the costly runs 19 % of the time, the others 0.7 %
    (BENCHMARKS.md, 12-06). -1 is the default target again.
    """

    dependencies = [("saga", "0011_redundant_indexes")]

    operations = [
        migrations.RunSQL(
            sql=_statistics("saga_sagastep", STEP_COLUMNS, 0),
            reverse_sql=_statistics("saga_sagastep", STEP_COLUMNS, -1),
        ),
        migrations.RunSQL(
            sql=_statistics("saga_sagainstance", SAGA_COLUMNS, 0),
            reverse_sql=_statistics("saga_sagainstance", SAGA_COLUMNS, -1),
        ),
    ]
