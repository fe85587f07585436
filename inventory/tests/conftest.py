"""Database-level tests of the inventory app: the inventory database only.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in a transaction that is rolled back.
"""

import pytest

from common.tests.databases import migrate_test_databases


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring the inventory schema up to date."""
    migrate_test_databases(django_db_blocker, ["inventory"])
