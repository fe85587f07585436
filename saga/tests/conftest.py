"""Database-level tests of the saga store: the orders database only, no workers or broker.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in a transaction that is rolled back, so nothing it writes commits,
and `transaction.on_commit` publishes nothing.
"""

import pytest
from django.conf import settings
from django.core.management import call_command


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring the orders schema up to date."""
    name = settings.DATABASES["orders"]["NAME"]
    if "test" not in name:
        pytest.exit(f"refusing to run database tests against {name!r}: run `make test`", returncode=2)
    with django_db_blocker.unblock():
        call_command("migrate", database="orders", verbosity=0)
