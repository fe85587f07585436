"""No index without a query (common.indexes), and migrations that say what the models say."""

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connections, router

from saga.tests.conftest import django_db_setup  # noqa: F401  (the fixture, shared)

OUR_APPS = ("common", "orders", "saga", "inventory", "payments", "notifications")
ALIASES = ["default", "orders", "inventory", "payments", "notifications"]
# LIKE twins kept on purpose: the catalogue's SKU (the admin may search it by prefix, and a
# product is written a few times a day, not on every order).
PATTERN_OPS_KEPT = {("inventory_product", "sku")}

# Every non-partial btree index of a table: name, unique, its columns in order, whether a
# column uses a pattern operator class.
INDEXES = """
SELECT i.relname, x.indisunique,
       array_agg(a.attname ORDER BY k.ord),
       bool_or(opc.opcname LIKE '%%pattern_ops')
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_am am ON am.oid = i.relam
CROSS JOIN LATERAL unnest(x.indkey, x.indclass) WITH ORDINALITY AS k(attnum, opclass, ord)
JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
JOIN pg_opclass opc ON opc.oid = k.opclass
WHERE x.indrelid = to_regclass(%s) AND x.indpred IS NULL AND x.indexprs IS NULL AND am.amname = 'btree'
GROUP BY i.relname, x.indisunique
"""


def _tables(alias: str) -> list[str]:
    return sorted(
        {
            model._meta.db_table
            for model in apps.get_models()
            if model._meta.app_label in OUR_APPS and not model._meta.proxy and router.db_for_write(model) == alias
        }
    )


def redundant_indexes(alias: str) -> list[str]:
    """This database's indexes that no query of ours needs, as `table.index (why)`."""
    found = []
    with connections[alias].cursor() as cursor:
        for table in _tables(alias):
            cursor.execute(INDEXES, [table])
            indexes = cursor.fetchall()
            for name, unique, columns, pattern_ops in indexes:
                if pattern_ops and (table, columns[0]) not in PATTERN_OPS_KEPT:
                    found.append(f"{table}.{name} (a LIKE twin; every lookup is by equality)")
                elif not unique and len(columns) == 1:
                    covering = [
                        other
                        for other, _, other_columns, other_pattern in indexes
                        if other != name
                        and len(other_columns) > 1
                        and other_columns[0] == columns[0]
                        and not other_pattern
                    ]
                    if covering:
                        found.append(f"{table}.{name} ({covering[0]} starts with {columns[0]})")
    return found


@pytest.mark.django_db(databases=ALIASES)
def test_no_index_without_a_query() -> None:
    assert {alias: redundant_indexes(alias) for alias in ALIASES} == {alias: [] for alias in ALIASES}


@pytest.mark.django_db(databases=ALIASES)
def test_the_indexes_the_lookups_need_are_there() -> None:
    """What the drop kept: each lookup of a dropped index has another that starts with it."""
    with connections["orders"].cursor() as cursor:
        cursor.execute(INDEXES, ["saga_sagastep"])
        step_indexes = {columns[0] for _, _, columns, _ in cursor.fetchall()}
        cursor.execute(INDEXES, ["saga_sagainstance"])
        saga_indexes = {name: columns for name, _, columns, _ in cursor.fetchall()}
    assert "saga_id" in step_indexes
    assert saga_indexes["saga_trace_id_idx"] == ["trace_id"]


@pytest.mark.django_db(databases=ALIASES)
def test_the_migrations_say_what_the_models_say() -> None:
    # --check exits non-zero when a model changed without its migration.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
