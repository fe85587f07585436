"""The watchdog returns a message only on a look that heard every worker, and returns
the message a worker died taking off its queue.

An early look stops once as many workers have answered as the last whole look heard (one
broadcast otherwise always waits its whole timeout). A worker that joined since (a
scale-up, a restart after a kill) is then missed; a look like that may suspect a message,
never return it: a live worker's message returned while it runs is a second copy, and a
step in its retry's countdown would have its copies multiply with every round.

Against the test session's Redis, in a database of its own (no worker's watchdog reads it).
"""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from kombu import Connection

from common.kombu_fixes import delivering_key
from devstack.topology import BASE_DIR
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


# --- A worker killed between taking a message and recording it (common.kombu_fixes) ------


@pytest.fixture
def empty_broker() -> Iterator[Any]:
    if not recovery.is_redis():
        pytest.skip("Redis's delivery only (RabbitMQ returns a dead consumer's messages itself)")
    url = settings.CELERY_BROKER_URL.rsplit("/", 1)[0] + "/13"
    with Connection(url, transport_options={"priority_steps": [0]}) as connection:
        channel = connection.default_channel
        keys = [channel.unacked_key, channel.unacked_index_key, recovery.SUSPECTS_KEY, recovery.LOCK_KEY]
        keys += ["payments", delivering_key("payments")]
        channel.client.delete(*keys)
        yield connection
        channel.client.delete(*keys)


def publish_then_die_taking_it(connection: Any, mode: str) -> Any:
    """One message in the payments queue, taken by a consumer SIGKILLed before it records it."""
    connection.Producer().publish({"amount": 950}, routing_key="payments", headers={"id": TASK})
    url = connection.as_uri(include_password=True)
    died = subprocess.run(
        [sys.executable, "-m", "tests.dies_taking_a_message", url, "payments", mode],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert died.returncode == -9, died.stdout + died.stderr
    return connection.default_channel.client


def test_kombus_own_delivery_loses_the_message_of_a_worker_killed_taking_it(empty_broker: Any) -> None:
    """Why common.kombu_fixes keeps the delivery: upstream kombu (BRPOP, then HSET) holds the
    message only in the consumer's memory in between. Fails once kombu fixes it: then remove
    that patch (celery/kombu#1836)."""
    client = publish_then_die_taking_it(empty_broker, "upstream")

    assert (client.llen("payments"), client.hlen(empty_broker.default_channel.unacked_key)) == (0, 0)
    assert client.llen(delivering_key("payments")) == 0  # in no queue, no list, no hash: lost


def test_a_message_its_worker_died_taking_is_returned_in_two_looks(empty_broker: Any, monkeypatch) -> None:
    client = publish_then_die_taking_it(empty_broker, "kept")
    assert (client.llen("payments"), client.llen(delivering_key("payments"))) == (0, 1)
    assert client.hlen(empty_broker.default_channel.unacked_key) == 0

    def no_broadcast(*_: Any, **__: Any) -> None:
        raise AssertionError("a message nobody recorded needs no worker's answer")

    monkeypatch.setattr(recovery, "held_task_ids", no_broadcast)
    now = time.time()
    assert recovery.orphans_restore(now=now, connection=empty_broker) == {"suspected": 1}
    assert client.llen("payments") == 0  # one look only suspects: its taker may still record it
    later = now + settings.SAGA_ORPHAN_CONFIRM + 0.1
    assert recovery.orphans_restore(now=later, connection=empty_broker) == {"restored": 1}
    assert recovery.orphans_restore(now=later + 0.1, connection=empty_broker) == {}

    assert client.llen(delivering_key("payments")) == 0
    [returned] = [json.loads(raw) for raw in client.lrange("payments", 0, -1)]
    assert returned["headers"] == {"id": TASK, "redelivered": True}
    channel = empty_broker.default_channel
    assert channel.Message(returned, channel=channel).decode() == {"amount": 950}


def test_a_message_its_live_worker_records_between_two_looks_is_not_returned(empty_broker: Any) -> None:
    empty_broker.Producer().publish({"amount": 950}, routing_key="payments", headers={"id": TASK})
    client = empty_broker.default_channel.client
    taken = client.lmove("payments", delivering_key("payments"), "RIGHT", "LEFT")  # as a worker's BLMOVE
    now = time.time()
    assert recovery.orphans_restore(now=now, connection=empty_broker) == {"suspected": 1}

    client.lrem(delivering_key("payments"), 1, taken)  # the worker recorded it as unacknowledged
    assert recovery.orphans_restore(now=now + settings.SAGA_ORPHAN_CONFIRM + 0.1, connection=empty_broker) == {}
    assert client.llen("payments") == 0
