"""A short, seeded `make chaos` run: faults while orders flow, then the audit must be clean.

Replicated, as on two hosts (docs/CONTAINERS.md "Several hosts"): two workers per queue, each its own
node, and two beats, so every sweep is sent twice and two sweepers (the two saga workers)
run at once, while a kill takes down one replica of a queue. One run covers both the
faults and the replicas: the topology's start and the databases' set-up, not the orders,
are most of its time, and a second run would pay them again (a single-replica topology is
what every other system test runs). Runs in both passes of `make test`.
"""

import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from devstack.topology import BASE_DIR

pytestmark = [pytest.mark.integration, pytest.mark.broker]


def test_a_short_replicated_chaos_run_finishes_every_saga_with_a_clean_audit() -> None:
    env = {**os.environ, **json.loads(os.environ["DEVSTACK_SERVER_URLS"])}
    args = ["--orders", "40", "--rate", "10", "--seed", "11", "--budget", "300"]
    args += ["--kills", "2", "--duplicates", "6", "--races", "6", "--replicas", "2"]
    if settings.CELERY_BROKER_URL.startswith("amqp"):
        # A vhost of its own, named after the one this test session's workers consume, so
        # that checkouts sharing a RabbitMQ (each with its TEST_AMQP_URL) keep apart.
        url = urlsplit(settings.CELERY_BROKER_URL)
        env["CHAOS_AMQP_URL"] = url._replace(path=f"/{url.path.lstrip('/') or 'saga'}_chaos").geturl()
        # Drops stay within that vhost. No broker restart here: `rabbitmqctl stop_app` stops
        # the whole node, every vhost's clients with it (this session's own workers, and any
        # other checkout's test run on the same broker); the Redis pass restarts its private
        # broker, and `make chaos --broker amqp` restarts RabbitMQ (BENCHMARKS.md, "Chaos").
        args += ["--broker", "amqp", "--broker-restarts", "0", "--drops", "3"]
    else:
        args += ["--broker-restarts", "1", "--drops", "3"]

    run = subprocess.run(
        [sys.executable, "-m", "devstack", "chaos", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True
    )

    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    chaos_dir = BASE_DIR / ".data" / "chaos"
    summary = json.loads((chaos_dir / "report.json").read_text())["summary"]
    assert summary["replicas"] == 2
    assert summary["submitted"] == 40
    assert summary["violations"] == 0
    assert summary["unrecovered_faults"] == 0, output[-4000:]
    assert sum(summary["outcomes"].values()) == 40
    assert set(summary["sagas"]) <= {"completed", "compensated"}
    assert summary["faults"]["kill"] == 2
    assert summary["faults"]["race"] == 6
    # Two beats ran to the end, and the two saga workers ran the sweeps they sent. (A routine
    # sweep writes no log line: the counts are the workers' own. How the sweeps are shared
    # between the two is the broker's choice: on RabbitMQ one may take almost all of them.)
    for name in ("beat", "beat-2"):
        assert "beat: Starting" in (chaos_dir / "logs" / f"{name}.log").read_text(), name
    assert not [crash for crash in summary["crashes"] if crash.startswith("beat")], summary["crashes"]
    assert len(summary["sweeps"]) == 2 and sum(summary["sweeps"].values()) > 0, summary["sweeps"]
    print(output[output.find("chaos report") :])


@pytest.mark.skipif(not settings.CELERY_BROKER_URL.startswith("amqp"), reason="a RabbitMQ drop")
def test_a_rabbitmq_drop_takes_the_oldest_message_off_the_queue_for_good() -> None:
    # A queue of its own in this session's vhost: the workers' queues are not ours to empty.
    import random

    from kombu import Connection, Exchange, Queue

    from devstack.chaos import RabbitBroker

    queue = Queue(f"chaos-drop-{os.getpid()}", Exchange("chaos-drop", type="direct"), routing_key="drop")
    with Connection(settings.CELERY_BROKER_URL, transport_options={"confirm_publish": True}) as connection:
        producer = connection.Producer()
        # The first is a failure report: its saga is named in what it shows of its kwargs.
        saga = "51bfb0fd-18fd-4561-ba83-f2ffa1bd2643"
        shown = f"{{'saga_id': '{saga}', 'step': 'charge_payment', 'authority': <failure report>}}"
        for headers in ({"id": "first", "kwargsrepr": shown}, {"id": "second"}):
            producer.publish({}, exchange=queue.exchange, routing_key="drop", declare=[queue], headers=headers)
        try:
            broker = RabbitBroker(settings.CELERY_BROKER_URL)
            dropped = broker.drop(random.Random(1), queues=("chaos-drop-none", queue.name))
            assert dropped == (queue.name, "first", saga)
            assert queue(connection.channel()).queue_declare(passive=True).message_count == 1
            assert queue(connection.channel()).get(no_ack=True).headers["id"] == "second"
            assert broker.drop(random.Random(1), queues=(queue.name,)) is None
        finally:
            queue(connection.channel()).delete()
