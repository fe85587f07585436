"""Database tests of what the services share (the admin's list pages): every service
database, no workers or broker. Run through `make test`, which made the *_test databases."""

import pytest

from common.tests.databases import migrate_test_databases

ALIASES = ("default", "orders", "inventory", "payments", "notifications")


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring their schemas up to date."""
    migrate_test_databases(django_db_blocker, ALIASES)
