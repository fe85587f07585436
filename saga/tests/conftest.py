"""Database-level tests of the saga store: the orders database only, no workers or broker.

Run through `make test`, which creates fresh *_test databases and points the settings at
them. Each test runs in a transaction that is rolled back, so nothing it writes commits,
and `transaction.on_commit` publishes nothing.
"""

from collections.abc import Iterator

import pytest

from common.tests.databases import migrate_test_databases
from saga import broker_latch as latch_module
from saga.broker_latch import BrokerLatch


@pytest.fixture(scope="session")
def django_db_setup(django_db_blocker) -> None:
    """The databases exist already (make test made them); bring the orders schema up to date."""
    migrate_test_databases(django_db_blocker, ["orders"])


@pytest.fixture(autouse=True)
def broker_latch(monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerLatch]:
    """A latch of this test's own: one that a test's failed publish closed must not skip
    the next test's publishes (saga.broker_latch)."""
    fresh = BrokerLatch(latch_module._broker_answers, lambda: 0.1)
    monkeypatch.setattr(latch_module, "LATCH", fresh)
    yield fresh
