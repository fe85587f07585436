"""Database-level tests of the inventory app: the inventory database only.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in a transaction that is rolled back.
"""

import pytest
from django.conf import settings
from django.core.management import call_command


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring the inventory schema up to date."""
    name = settings.DATABASES["inventory"]["NAME"]
    if "test" not in name:
        pytest.exit(f"refusing to run database tests against {name!r}: run `make test`", returncode=2)
    with django_db_blocker.unblock():
        call_command("migrate", database="inventory", verbosity=0)
