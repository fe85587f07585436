"""The hot path's statements really run prepared (settings: DB_PREPARED_STATEMENTS).

Django leaves psycopg's prepare_threshold at None, which turns `prepare=True` into a no-op:
the statements were sent as new text and planned on every execution until this was set.
"""

import pytest
from django.db import connections

from common.sql import prepared
from saga.tests.conftest import django_db_setup  # noqa: F401  (the fixture, shared)

STATEMENT = "SELECT count(*) FROM saga_sagainstance WHERE id = %s::uuid"


def _prepared_statements() -> list[str]:
    with connections["orders"].cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(databases=["orders"])
def test_a_hot_statement_is_prepared_once_and_reused() -> None:
    for _ in range(3):
        with prepared("orders") as cursor:
            cursor.execute(STATEMENT, ["00000000-0000-0000-0000-000000000000"])
            assert cursor.fetchone() == (0,)
    statements = [s for s in _prepared_statements() if "saga_sagainstance WHERE id = $1" in s]
    assert len(statements) == 1, statements


@pytest.mark.django_db(databases=["orders"])
def test_the_orms_own_queries_are_never_prepared() -> None:
    from saga.models import SagaInstance

    for _ in range(10):
        list(SagaInstance.objects.filter(status="running")[:1])
    assert not [s for s in _prepared_statements() if "saga_sagainstance" in s and "status" in s]
