"""The watchdog returns a message only on a look that heard every worker.

An early look stops once as many workers have answered as the last whole look heard (one
broadcast otherwise always waits its whole timeout). A worker that joined since (a
scale-up, a restart after a kill) is then missed; a look like that may suspect a message,
never return it: a live worker's message returned while it runs is a second copy, and a
step in its retry's countdown would have its copies multiply with every round.

Against the test session's Redis, in a database of its own (no worker's watchdog reads it).
"""

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from kombu import Connection

from saga import recovery

pytestmark = [pytest.mark.redis_only]

TAG, TASK = "delivery-1", "saga-x-charge_payment-g0"


@pytest.fixture
def broker() -> Iterator[Any]:
    if not recovery.is_redis():
        pytest.skip("the watchdog runs on Redis only (RabbitMQ returns a dead consumer's messages itself)")
    url = settings.CELERY_BROKER_URL.rsplit("/", 1)[0] + "/13"
    with Connection(url) as connection:
        channel = connection.default_channel
        keys = [channel.unacked_key, channel.unacked_index_key, recovery.SUSPECTS_KEY, recovery.LOCK_KEY, "payments"]
        channel.client.delete(*keys)
        message = {"body": "", "headers": {"id": TASK}, "properties": {"delivery_tag": TAG}}
        channel.client.hset(channel.unacked_key, TAG, json.dumps([message, "", "payments"]))
        channel.client.zadd(channel.unacked_index_key, {TAG: time.time() - 10})  # taken 10 s ago
        yield connection
        channel.client.delete(*keys)


def answering(monkeypatch: pytest.MonkeyPatch, *, early: tuple[set, int], whole: tuple[set, int]) -> list[bool]:
    """The workers' answers: what an early look hears, and what a whole one does."""
    looks: list[bool] = []

    def held(task_ids: Any, *, early: bool = False, connection: Any = None) -> tuple[set, int]:
        looks.append(early)
        return answers[early]

    answers = {True: early, False: whole}
    monkeypatch.setattr(recovery, "held_task_ids", held)
    return looks


def test_a_message_a_late_joining_worker_holds_is_not_returned(broker: Any, monkeypatch) -> None:
    # The early look stops at the one worker it expects; the one holding the task joined since.
    looks = answering(monkeypatch, early=(set(), 1), whole=({TASK}, 2))
    now = time.time()

    assert recovery.orphans_restore(now=now, connection=broker) == {"suspected": 1}
    later = now + settings.SAGA_ORPHAN_CONFIRM + 0.1
    assert recovery.orphans_restore(now=later, connection=broker) == {}

    assert looks == [True, False]  # the look that could return it heard every worker
    client = broker.default_channel.client
    assert client.hexists(broker.default_channel.unacked_key, TAG)
    assert client.llen("payments") == 0


def test_a_message_nobody_holds_in_a_whole_look_is_returned(broker: Any, monkeypatch) -> None:
    looks = answering(monkeypatch, early=(set(), 1), whole=(set(), 2))
    now = time.time()

    assert recovery.orphans_restore(now=now, connection=broker) == {"suspected": 1}
    assert recovery.orphans_restore(now=now + settings.SAGA_ORPHAN_CONFIRM + 0.1, connection=broker) == {"restored": 1}

    assert looks == [True, False]
    client = broker.default_channel.client
    assert not client.hexists(broker.default_channel.unacked_key, TAG)
    assert client.llen("payments") == 1
