"""A notification's claim whose owner process is provably gone is taken over at once.

A copy of the notification step that finds the outcome's rows claimed by another attempt
waits (retries) until the claim's lease ends: its owner may still be talking to the mail
server. The lease outlasts the task's hard time limit, so a worker SIGKILLed mid-send
kept the message waiting that long after the broker had handed it to a live worker
(20.9 s in `make chaos` on 12-06, issue 11 asks 15). A claim now names its owner process
(common.liveness), and a copy takes over the claim of one that is provably dead, and only
of such a one: alive, or on another host, it still waits out the lease.
"""

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from common.exceptions import TransientError
from common.liveness import process_gone, process_identity
from notifications.models import Notification
from notifications.services import notification_send

from .api import another_process

pytestmark = pytest.mark.usefixtures("db_access")


def left_mid_send(saga_id: uuid.UUID, owner: str) -> None:
    """What an attempt that claimed the outcome and was then stopped mid-send leaves: the
    row sending, under its claim, with a lease far from over."""
    Notification.objects.create(
        saga_id=saga_id,
        order_id=uuid.uuid4(),
        kind=Notification.Kind.ORDER_CONFIRMED,
        channel=Notification.Channel.EMAIL,
        recipient="buyer@example.com",
        subject="Your order is confirmed",
        body="Thank you!",
        status=Notification.Status.SENDING,
        claim_token=uuid.uuid4(),
        lease_until=timezone.now() + timedelta(minutes=5),
        claimed_by=owner,
    )


def send(saga_id: uuid.UUID) -> dict:
    return notification_send(
        saga_id=saga_id, order_id=uuid.uuid4(), outcome="confirmed", email="buyer@example.com", phone="", amount="9"
    )


def status(saga_id: uuid.UUID) -> str:
    return Notification.objects.get(saga_id=saga_id).status


def test_a_claim_whose_owner_died_mid_send_is_taken_over_at_once() -> None:
    saga_id = uuid.uuid4()
    with another_process() as (owner, identity):
        assert identity and not process_gone(identity)
        left_mid_send(saga_id, identity)
        # Alive: it may be in the middle of the send, so the copy keeps off until the lease ends.
        with pytest.raises(TransientError, match="being sent by another copy"):
            send(saga_id)
        assert status(saga_id) == "sending"
        owner.kill()
        owner.wait()
    assert process_gone(identity)

    assert send(saga_id) == {"notified": "order_confirmed", "channels": ["email"]}
    row = Notification.objects.get(saga_id=saga_id)
    assert (row.status, row.claimed_by) == ("sent", process_identity())


@pytest.mark.parametrize(
    "owner",
    [
        "another-host/boot/pid:[1]|4242|1000",  # another machine or container: nothing to see from here
        "",  # a claim written where the owner could not be named
    ],
)
def test_a_claim_whose_owner_cannot_be_seen_waits_for_its_lease(owner: str) -> None:
    saga_id = uuid.uuid4()
    left_mid_send(saga_id, owner)
    with pytest.raises(TransientError, match="being sent by another copy"):
        send(saga_id)
    assert status(saga_id) == "sending"


def test_a_new_claim_names_its_owner() -> None:
    saga_id = uuid.uuid4()
    send(saga_id)
    assert Notification.objects.get(saga_id=saga_id).claimed_by == process_identity() != ""
