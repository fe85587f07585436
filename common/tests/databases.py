"""The database-level tests' setup, shared by each app's conftest: `make test` has made
fresh *_test databases already; bring the schemas the tests use up to date, and refuse to
run against anything else."""

from collections.abc import Iterable
from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command


def migrate_test_databases(django_db_blocker: Any, aliases: Iterable[str]) -> None:
    aliases = list(aliases)
    names = [settings.DATABASES[alias]["NAME"] for alias in aliases]
    if not all("test" in name for name in names):
        pytest.exit(f"refusing to run database tests against {names}: run `make test`", returncode=2)
    with django_db_blocker.unblock():
        for alias in aliases:
            call_command("migrate", database=alias, verbosity=0)
