"""The saga store's writes (common.db.update_statement) as PostgreSQL plans them once prepared."""

import pytest
from django.db import connections

from common.db import update_statement
from saga.models import SagaInstance, SagaStep
from saga.tests.coordinator import start

pytestmark = pytest.mark.django_db(databases=["orders", "default"])


def test_a_prepared_update_finds_its_rows_by_index_not_by_scanning_the_table() -> None:
    """A generic plan guesses 100 rows for the JSON of rows to write; against a table of a
    few thousand rows that chose a hash join over a sequential scan of the whole table, on
    every write of the saga store (BENCHMARKS.md, 12-03 fifth run)."""
    connection = connections["orders"]
    if connection.pg_version < 160000:
        pytest.skip("EXPLAIN (GENERIC_PLAN) needs PostgreSQL 16")
    saga_id = start().id
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO saga_sagastep (saga_id, phase, position, name, task_name, status, attempts, "
            "celery_task_id, worker, last_error, result, republished) "
            "SELECT %s, 'forward', 0, 'step-' || i, 't', 'pending', 0, '', '', '', '{}', 0 "
            "FROM generate_series(1, 5000) AS i",
            [saga_id],
        )
        cursor.execute("ANALYZE saga_sagastep")
        step = SagaStep.objects.using("orders").filter(saga_id=saga_id).first()
        saga = SagaInstance.objects.using("orders").get(id=saga_id)
        sql, params = update_statement("orders", ([step], ["status"]), ([saga], ["status"]))
        cursor.execute(f"EXPLAIN (GENERIC_PLAN) {_numbered(sql)}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Seq Scan on saga_sagastep" not in plan, plan
    assert len(params) == 4  # each table's rows, and their keys


def _numbered(sql: str) -> str:
    """`%s` placeholders as PostgreSQL's `$1`, `$2`, ... (what EXPLAIN (GENERIC_PLAN) takes)."""
    parts = sql.split("%s")
    return "".join(part + (f"${i + 1}" if i < len(parts) - 1 else "") for i, part in enumerate(parts))
