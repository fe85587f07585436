"""The embedded PostgreSQL runs with devstack's settings (devstack.services.PG_SETTINGS),
the one `make run`, `make test` and `make bench` use when no server is configured."""

import pytest
from django.db import connections

from devstack.services import PG_SETTINGS
from saga.tests.conftest import django_db_setup  # noqa: F401  (the fixture, shared)

pytestmark = pytest.mark.django_db(databases=["orders"])


def test_the_embedded_server_analyzes_growing_tables_within_seconds() -> None:
    """Else the workers' prepared statements keep the plans they got on empty tables, and
    the confirm scans the whole step table for its first minute (docs/DECISIONS.md)."""
    with connections["orders"].cursor() as cursor:
        cursor.execute("SELECT current_setting('cluster_name'), current_setting('autovacuum_naptime')")
        cluster, naptime = cursor.fetchone()
    if cluster != PG_SETTINGS["cluster_name"]:
        pytest.skip(f"a PostgreSQL server of its own ({cluster!r}): its settings are its operator's")
    assert naptime == PG_SETTINGS["autovacuum_naptime"] == "5s"
