"""RabbitMQ as the broker (docs/CONTAINERS.md "Several hosts"): the service queues are durable quorum
queues, and every publish, the workers' included, waits for the broker's confirm.

Runs in `make test`'s RabbitMQ pass (marked `broker`); on Redis there is nothing to check
and it is skipped.
"""

import time
import uuid

import amqp
import pytest
from django.conf import settings

from devstack.topology import WORKERS, Topology, wait_for
from orders_project.celery import app
from saga import recovery

from .api import Api, make_product

pytestmark = [
    pytest.mark.integration,
    pytest.mark.broker,
    pytest.mark.skipif(not settings.CELERY_BROKER_URL.startswith("amqp"), reason="RabbitMQ only: the broker is Redis"),
]


def _declare(name: str, queue_type: str) -> None:
    # A declaration is accepted only when it is equivalent to the queue's own (durable,
    # x-queue-type); otherwise the broker refuses it and closes the channel (406).
    with app.connection_for_write() as connection:
        channel = connection.channel()
        channel.queue_declare(queue=name, durable=True, auto_delete=False, arguments={"x-queue-type": queue_type})


def test_the_service_queues_are_durable_quorum_queues(topology: Topology) -> None:
    # The session's workers declared their queues at start.
    for queue in WORKERS:
        _declare(queue, "quorum")
        with pytest.raises(amqp.exceptions.PreconditionFailed, match="x-queue-type"):
            _declare(queue, "classic")


def test_every_process_publishes_with_confirms_to_quorum_queues(topology: Topology) -> None:
    # What each running worker was configured with, in its own words (remote control).
    replies = app.control.inspect(timeout=2.0).conf(with_defaults=True) or {}
    nodes = {node.split("@")[0]: conf for node, conf in replies.items()}
    assert set(WORKERS) <= set(nodes), sorted(nodes)
    for name in WORKERS:
        conf = nodes[name]
        assert conf["broker_transport_options"]["confirm_publish"] is True, name
        assert conf["task_default_queue_type"] == conf["task_create_missing_queue_type"] == "quorum", name
        # Quorum queues have no global QoS: Celery must set its prefetch per consumer.
        assert conf["worker_detect_quorum_queues"] is True, name

    # And a publish from this process (the web's path) goes through a channel in confirm
    # mode: py-amqp then waits for the broker's basic.ack before returning.
    with app.producer_or_acquire() as producer:
        producer.publish({"probe": True}, exchange="", routing_key="saga-confirm-probe", declare=[])
        assert producer.channel._confirm_selected is True


def test_the_workers_say_how_far_they_have_got_in_their_queues(api: Api, sku: str) -> None:
    """What the sweeper asks instead of the head of a queue it cannot peek (saga.recovery)."""
    make_product(sku, on_hand=2)
    placed_at = time.time()
    order = api.wait_until_final(api.place_order([(sku, 1)])["id"])
    assert order["status"] == "confirmed"

    def heads() -> dict[str, float]:
        return recovery.taken_heads()

    path = ("inventory", "payments", "orders", "notifications")
    wait_for(
        lambda: all(heads().get(queue, recovery.UNKNOWN) >= placed_at - settings.SAGA_CLOCK_SLACK for queue in path),
        timeout=30,
        what="every worker on the order's way to have noted its message",
    )


def test_a_busy_queues_head_is_how_far_its_workers_have_got(topology: Topology) -> None:
    name = f"tests-heads-{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as connection:
        channel = connection.channel()
        channel.queue_declare(queue=name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        try:
            with app.producer_or_acquire() as producer:
                producer.publish({"probe": True}, exchange="", routing_key=name, declare=[])
            assert recovery.queue_heads([name], taken={name: 5.0}) == {name: 5.0}
            # Before any live worker took from it, a busy queue's head is unknown.
            assert recovery.queue_heads([name]) == {name: recovery.UNKNOWN}
            channel.queue_purge(name)
            assert recovery.queue_heads([name], taken={name: 5.0}) == {name: recovery.EMPTY}
        finally:
            channel.queue_delete(name)
