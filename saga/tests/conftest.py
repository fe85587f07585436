"""Database-level tests of the saga store: the orders database only, no workers or broker.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in a transaction that is rolled back, so nothing it writes commits,
and `transaction.on_commit` publishes nothing.
"""

import pytest

from common.tests.databases import migrate_test_databases
from saga.tests.fixtures import broker_latch  # noqa: F401  # autouse: each test's own latch


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring the orders schema up to date."""
    migrate_test_databases(django_db_blocker, ["orders"])
