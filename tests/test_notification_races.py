"""Copies of the notification step racing each other around the delivery, one interleaving
at a time: threads calling the notifications service against the real notifications
database, with the delivery held inside the call until the test lets it go
(tests/test_races.py races real messages on real workers; these force the windows a
worker's timing rarely hits).
"""

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError

from common.exceptions import TransientError
from notifications import channels, services
from notifications.models import Notification

from .copies import Copy

pytestmark = pytest.mark.usefixtures("db_access")


class HeldDelivery:
    """Counts every delivery by channel; one made from a thread named in `hold` waits,
    after the server has the message, until the test releases it."""

    def __init__(self) -> None:
        self.hold: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sent: list[str] = []

    def deliver(self, channel: str) -> None:
        self.sent.append(channel)
        if threading.current_thread().name in self.hold:
            self.entered.set()
            assert self.release.wait(30), "the test never released the held delivery"


@pytest.fixture
def delivery(monkeypatch: pytest.MonkeyPatch) -> HeldDelivery:
    held = HeldDelivery()
    monkeypatch.setattr(channels, "send_email", lambda **_: held.deliver("email"))
    monkeypatch.setattr(channels, "send_sms", lambda **_: held.deliver("sms"))
    return held


@pytest.fixture
def outcome() -> Iterator[dict[str, Any]]:
    yield {"saga_id": uuid.uuid4(), "order_id": uuid.uuid4(), "outcome": "confirmed", "email": "c@example.com"}


def test_a_copy_that_reads_while_another_finishes_retries_and_never_fails(
    delivery: HeldDelivery, outcome: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copy A sends and then records the outcome with its last mark, without the saga lock;
    copy B, a redelivery, decides under that lock from two reads. A finishing between them
    used to leave B finding every row sent and no key, recording the key A had just
    recorded: an IntegrityError, which no retry covers, and a completed saga's step
    reported failed."""
    delivery.hold.add("A")
    first = Copy("A", services.notification_send, **outcome)
    first.start()
    assert delivery.entered.wait(30)
    real_processed_result = services.processed_result

    def first_finishes_between_the_reads(*args: Any, **kwargs: Any) -> Any:
        read = real_processed_result(*args, **kwargs)
        if threading.current_thread().name == "B":
            delivery.release.set()
            first.join(30)
        return read

    monkeypatch.setattr(services, "processed_result", first_finishes_between_the_reads)
    later = Copy("B", services.notification_send, **outcome)
    later.start()
    result = first.outcome()
    try:
        assert later.outcome() == result
    except TransientError:
        pass  # it saw A's claim live: a retry finds the outcome recorded
    assert services.notification_send(**outcome) == result
    assert delivery.sent == ["email"]
    assert list(Notification.objects.filter(saga_id=outcome["saga_id"]).values_list("status", flat=True)) == ["sent"]


def test_a_delivery_whose_mark_fails_is_not_handed_to_the_retry(
    delivery: HeldDelivery, outcome: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An email delivered, then its mark failing (a statement timeout, the soft time limit
    landing there): the attempt let every row it claimed go, the email too, and the retry
    sent it again. Now what it delivered is marked sent, and only the rest is let go."""
    outcome["phone"] = "+15550100"
    real_mark_sent = services._mark_sent
    failures = iter([OperationalError("canceling statement due to statement timeout")])

    def mark_sent_fails_once(pk: int, claim: uuid.UUID) -> bool:
        if (error := next(failures, None)) is not None:
            raise error
        return real_mark_sent(pk, claim)

    monkeypatch.setattr(services, "_mark_sent", mark_sent_fails_once)
    with pytest.raises(OperationalError):
        services.notification_send(**outcome)
    rows = dict(Notification.objects.filter(saga_id=outcome["saga_id"]).values_list("channel", "status"))
    assert rows == {"email": "sent", "sms": "pending"}

    result = services.notification_send(**outcome)  # the retry
    assert result["channels"] == ["email", "sms"]
    assert sorted(delivery.sent) == ["email", "sms"]
