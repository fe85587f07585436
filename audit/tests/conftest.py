"""Database tests of the audit: every service database, no workers or broker.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in transactions that are rolled back, so nothing it writes commits.
"""

import pytest
from django.conf import settings
from django.core.management import call_command

ALIASES = ("default", "orders", "inventory", "payments", "notifications")


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring their schemas up to date."""
    names = [settings.DATABASES[alias]["NAME"] for alias in ALIASES]
    if not all("test" in name for name in names):
        pytest.exit(f"refusing to run database tests against {names}: run `make test`", returncode=2)
    with django_db_blocker.unblock():
        for alias in ALIASES:
            call_command("migrate", database=alias, verbosity=0)
