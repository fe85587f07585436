"""Fixtures the saga's tests and the system tests share (imported by both conftests)."""

from collections.abc import Iterator

import pytest

from saga import broker_latch as latch_module
from saga.broker_latch import BrokerLatch


@pytest.fixture(autouse=True)
def broker_latch(monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerLatch]:
    """A latch of this test's own: one that a test's failed publish closed must not skip
    the next test's publishes (saga.broker_latch)."""
    fresh = BrokerLatch(latch_module._broker_answers, lambda: 0.1)
    monkeypatch.setattr(latch_module, "LATCH", fresh)
    yield fresh
