"""Database-level tests of the orders app: the orders database only (saga.tests.conftest)."""

from saga.tests.conftest import django_db_setup  # noqa: F401  (the fixture, shared)
