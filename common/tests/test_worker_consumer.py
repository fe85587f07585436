"""common.worker_consumer: Celery's consumer reconnects every BROKER_RECONNECT_SECONDS, for
as long as its own schedule would have tried, and says so once in a while."""

import itertools
import json
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.message import Message

from common.worker_consumer import Consumer, _ensure_connection, dropped_return, kombu_patience, unacked_tags


def test_kombu_patience_is_the_default_schedule() -> None:
    assert kombu_patience(1) == 2
    assert kombu_patience(3) == 2 + 4 + 6
    assert kombu_patience(100) == sum(range(2, 31, 2)) + 85 * 30  # about 46 minutes


class Recorded:
    """Stands for kombu's Connection.ensure_connection: records how Celery's consumer,
    through ours, calls it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, dict[str, Any]]] = []

    def ensure_connection(self, errback: Any = None, max_retries: Any = None, **options: Any) -> "Recorded":
        self.calls.append((errback, max_retries, options))
        return self


def celery_consumer(max_retries: int | None) -> Any:
    """What Celery's Consumer.ensure_connected reads of itself, after the first connection."""
    conf = SimpleNamespace(
        broker_connection_retry_on_startup=True, broker_connection_retry=True, broker_connection_max_retries=max_retries
    )
    consumer = Consumer.__new__(Consumer)  # Celery's __init__ wants a whole worker
    consumer.app = SimpleNamespace(conf=conf)  # type: ignore[assignment]
    consumer.first_connection_attempt, consumer.broker_connection_retry_attempt = False, 0
    return consumer


@pytest.mark.parametrize(("max_retries", "expected"), [(100, (None, kombu_patience(100))), (None, (None, None))])
def test_celerys_consumer_reconnects_at_our_interval(
    settings: Any, max_retries: int | None, expected: tuple[Any, Any]
) -> None:
    settings.BROKER_RECONNECT_SECONDS = 0.5
    conn = Recorded()

    assert celery_consumer(max_retries).ensure_connected(conn) is conn

    [(errback, retries, options)] = conn.calls
    assert (retries, options.get("timeout")) == expected
    assert (options["interval_start"], options["interval_step"], options["interval_max"]) == (0.5, 0, 0.5)
    assert callable(errback) and "callback" in options  # Celery's shutdown check is kept


def test_a_broker_that_stays_away_is_tried_every_interval_and_logged_once(settings: Any) -> None:
    """Against a port nobody listens on (AMQP: it connects when asked; Redis waits for a
    channel): kombu's real retries, at our interval."""
    settings.BROKER_RECONNECT_SECONDS = 0.05
    attempts: list[float] = []
    logged: list[str] = []
    conn = Connection("amqp://guest:guest@127.0.0.1:1//", connect_timeout=0.2)
    factory = conn._connection_factory

    def counted() -> Any:
        attempts.append(time.monotonic())
        return factory()

    conn._connection_factory = counted  # type: ignore[method-assign]
    began = time.monotonic()
    with pytest.raises(OperationalError):
        _ensure_connection(conn.ensure_connection, lambda exc, interval: logged.append(str(exc)), None, timeout=1.0)
    assert time.monotonic() - began < 1.0 + 0.5
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) >= 8 and max(gaps) < 0.3, gaps  # kombu's own schedule: one attempt, then 2 s
    assert len(logged) == 1  # the first failure; the next line after QUIET_SECONDS, not one per attempt


# --- What the worker held and Celery dropped goes back to its queue (Redis) ------------


@dataclass(eq=False)
class HeldRequest:
    """What Celery's `on_close` reads of a request: its id and its message."""

    id: str
    message: Any


@pytest.fixture
def redis_url(settings: Any) -> str:
    if not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("RabbitMQ requeues a broken connection's unacknowledged messages itself")
    return settings.CELERY_BROKER_URL.rsplit("/", 1)[0] + "/12"  # a database no worker reads


def test_what_celery_dropped_at_a_broken_connection_goes_back_to_its_queue(redis_url: str) -> None:
    """Two messages taken and unacknowledged: one running (Celery keeps its request and
    acknowledges it when it ends), one held for later (Celery drops it). Only the second is
    returned, once, at the head of its queue, marked redelivered."""
    queue = Queue("held-here", Exchange("held-here"), "held-here")
    with Connection(redis_url) as publisher:
        publisher.default_channel.client.flushdb()
        producer = publisher.Producer()
        for n in (1, 2):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="held-here", declare=[queue])
    taker = Connection(redis_url)
    taken: list[Message] = []
    consumer = Consumer.__new__(Consumer)  # what on_close reads of Celery's consumer
    consumer.controller, consumer.task_buckets, consumer.timer, consumer.pool = None, {}, None, None
    try:
        with taker.Consumer(queue, callbacks=[lambda body, message: taken.append(message)]):
            while len(taken) < 2:
                taker.drain_events(timeout=5)
        running, waiting = HeldRequest("running", taken[0]), HeldRequest("waiting", taken[1])
        state.reserved_requests.update({running, waiting})
        state.active_requests.add(running)

        consumer._unacked_at_loss = unacked_tags(taker)
        assert set(consumer._unacked_at_loss) == {m.delivery_tag for m in taken}
        consumer.on_close()
        assert consumer._dropped == (waiting.message.delivery_tag,)

        with Connection(redis_url) as reconnected:
            assert dropped_return(reconnected, consumer._dropped) == 1
            assert dropped_return(reconnected, consumer._dropped) == 0  # returned once
            client = reconnected.default_channel.client
            [again] = client.lrange("held-here", 0, -1)
            assert json.loads(again)["headers"]["redelivered"] is True
            assert client.hkeys(reconnected.default_channel.unacked_key) == [running.message.delivery_tag.encode()]
    finally:
        state.reserved_requests.clear()
        state.active_requests.clear()
        taker.release()
        with Connection(redis_url) as cleaner:
            cleaner.default_channel.client.flushdb()


def test_nothing_is_noted_on_rabbitmq() -> None:
    assert unacked_tags(Connection("amqp://guest:guest@127.0.0.1:1//")) == ()
    assert unacked_tags(None) == ()
