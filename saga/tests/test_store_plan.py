"""The saga store's statements as PostgreSQL plans them."""

import importlib

import pytest
from django.db import connections, transaction

from common.db import update_statement
from saga import store
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


def test_the_store_never_keeps_a_plan_made_while_its_tables_were_small() -> None:
    """A prepared statement may keep one generic plan for its connection's life from its
    sixth execution. Made on new tables (a new deployment, each bench), the store's locked
    read scanned both tables whole (`EXPLAIN (GENERIC_PLAN)` on new tables: sequential scans
    in a nested loop), and kept scanning as they grew: the pivot's read went from 0.45 to
    17 ms a call within one bench phase (BENCHMARKS.md). So the store's read and write are
    never prepared: each is planned for its sagas at every execution (common.sql.prepared,
    `plan_once=False`)."""
    saga_ids = [start().id for _ in range(40)]
    for saga_id in saga_ids:
        with transaction.atomic(using="orders"):
            saga, steps = store.lock_saga_with_steps(saga_id, phase="forward")
            assert saga is not None
            store.save(saga, steps.values())
    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%FROM \"saga_sagainstance\" AS s LEFT JOIN%' "
            "OR statement LIKE '%UPDATE \"saga_sagastep\" AS t%'"
        )
        assert cursor.fetchall() == []


def _numbered(sql: str) -> str:
    """`%s` placeholders as PostgreSQL's `$1`, `$2`, ... (what EXPLAIN (GENERIC_PLAN) takes)."""
    parts = sql.split("%s")
    return "".join(part + (f"${i + 1}" if i < len(parts) - 1 else "") for i, part in enumerate(parts))


def test_analyze_skips_the_columns_no_plan_reads() -> None:
    """Autovacuum's ANALYZE of the growing step table sorted every sampled JSON result and
    task id (66 to 74 ms of CPU each time on 10,000 steps): the columns no statement filters,
    joins or sorts on carry no statistics (saga migration 0012); those the store's statements
    test keep theirs."""
    migration = importlib.import_module("saga.migrations.0012_analyze_less")
    with connections["orders"].cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, a.attname, coalesce(a.attstattarget, -1) FROM pg_attribute AS a "
            "JOIN pg_class AS c ON c.oid = a.attrelid "
            "WHERE c.relname IN ('saga_sagastep', 'saga_sagainstance') AND a.attnum > 0 AND NOT a.attisdropped"
        )
        targets = {(table, column): target for table, column, target in cursor.fetchall()}

    def skipped(table: str) -> set[str]:
        return {column for (t, column), target in targets.items() if t == table and target == 0}

    assert skipped("saga_sagastep") == set(migration.STEP_COLUMNS) >= {"result", "celery_task_id"}
    assert skipped("saga_sagainstance") == set(migration.SAGA_COLUMNS) >= {"context"}
    for kept in ("saga_id", "phase", "position", "name", "status", "deadline_at", "started_at", "worker"):
        assert targets[("saga_sagastep", kept)] != 0, kept
    for kept in ("id", "order_id", "status", "trace_id", "pivot_committed_at", "settled_at"):
        assert targets[("saga_sagainstance", kept)] != 0, kept
