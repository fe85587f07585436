"""Racing copies: several copies of one message delivered at the same time act once.

The copies are real messages: the saga's own, plus the same step published again by the
coordinator's publish path (as the sweeper re-publishes a step), all waiting in the
queue while the worker is down, so that its pool starts them together.
"""

import contextlib
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from celery.result import AsyncResult
from django.utils import timezone

from devstack.topology import Topology, wait_for
from notifications.models import Notification
from orders.saga import PLACE_ORDER
from orders_project.celery import app
from saga.engine import build_chain
from saga.models import SagaInstance

from .api import Api, make_product, result_wait

pytestmark = [pytest.mark.integration, pytest.mark.broker]

PHONE = "+15550100"


class SlowSmtpSink(socketserver.ThreadingTCPServer):
    """Just enough SMTP for Django's backend, on a free local port. It answers each message
    `delay` seconds after receiving it: a slow mail server, so a copy racing the one that is
    sending runs while that send is still in flight."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _SmtpSession)
        self.delay = delay
        # While set, each session waits before answering MAIL FROM, until `let_go`: a send
        # held before any of the message has reached the server.
        self.hold = threading.Event()
        self.let_go = threading.Event()
        self.messages: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def received(self, message: str) -> None:
        with self._lock:
            self.messages.append(message)

    def count(self, needle: str) -> int:
        with self._lock:
            return sum(needle in message for message in self.messages)


class _SmtpSession(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 sink ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line.strip().upper()[:4]
            if verb == b"DATA":
                self.wfile.write(b"354 end with <CRLF>.<CRLF>\r\n")
                lines = []
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    lines.append(chunk)
                self.server.received(b"".join(lines).decode(errors="replace"))
                time.sleep(self.server.delay)  # the slow server, not a wait in the test
                self.wfile.write(b"250 accepted\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            elif verb == b"MAIL" and self.server.hold.is_set():
                self.server.let_go.wait(timeout=60)
                with contextlib.suppress(OSError):  # the sender may have died meanwhile
                    self.wfile.write(b"250 ok\r\n")
            else:  # EHLO, MAIL, RCPT, RSET, NOOP
                self.wfile.write(b"250 ok\r\n")


def sending_to(topology: Topology, sink: SlowSmtpSink, sms_dir: Path) -> dict[str, str]:
    """The notifications worker's environment to send email to `sink` and SMS to `sms_dir`."""
    return {
        **topology.env,
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(sink.port),
        "SMS_FILE_PATH": str(sms_dir),
    }


@contextmanager
def notifications_down_then_on(topology: Topology, sink: SlowSmtpSink, sms_dir: Path) -> Iterator[None]:
    """The notifications worker is down inside the block (its messages wait in the queue);
    after it, it comes back sending email to `sink` and SMS to `sms_dir`. Restored at the
    end of the test."""
    worker = topology.processes["notifications"]
    worker.stop()
    try:
        yield
        worker.start(sending_to(topology, sink, sms_dir))
        topology.wait_ready(["notifications"])
    except BaseException:
        worker.start(topology.env)
        raise


@pytest.fixture
def mail(topology: Topology, tmp_path: Path) -> Iterator[tuple[SlowSmtpSink, Path]]:
    sink = SlowSmtpSink(delay=3)
    try:
        yield sink, tmp_path
    finally:
        worker = topology.processes["notifications"]
        worker.stop()
        worker.start(topology.env)
        topology.wait_ready(["notifications"])
        sink.shutdown()
        sink.server_close()


def sms_count(sms_dir: Path, needle: str) -> int:
    log = sms_dir / "sms.log"
    return sum(needle in line for line in log.read_text().splitlines()) if log.exists() else 0


def queued(queue: str) -> int:
    with app.connection_for_read() as connection:
        channel = connection.channel()
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        finally:
            channel.close()


def confirmed_and_notify_queued(api: Api, order_id: str, copies: int) -> tuple[SagaInstance, list[AsyncResult]]:
    """Wait until the order is confirmed and its notify message waits in the queue; then
    publish `copies` more copies of it. The saga as it is then, and the copies' results."""
    wait_for(lambda: api.order(order_id)["status"] == "confirmed", timeout=60, what="the order to be confirmed")
    wait_for(lambda: queued("notifications") >= 1, timeout=30, what="the notify message to be queued")
    saga = SagaInstance.objects.get(order_id=order_id)
    [notify] = [step for step in PLACE_ORDER.steps if step.name == "notify_customer"]
    results = [
        build_chain(
            [notify], saga_id=saga.id, generation=saga.generation + 100 + i, phase="forward", context=saga.context
        ).apply_async(ignore_result=False)
        for i in range(copies)
    ]
    wait_for(lambda: queued("notifications") >= 1 + copies, timeout=30, what="the copies to be queued")
    return saga, results


def retried_for_a_live_claim(topology: Topology, saga_id: uuid.UUID) -> bool:
    log = topology.processes["notifications"].log_path.read_text(errors="replace")
    return any(f"saga {saga_id}: " in line and "is being sent by another copy" in line for line in log.splitlines())


def test_racing_copies_of_a_notification_deliver_it_once_per_channel(
    api: Api, topology: Topology, sku: str, mail: tuple[SlowSmtpSink, Path]
) -> None:
    sink, sms_dir = mail
    make_product(sku, on_hand=5)
    with notifications_down_then_on(topology, sink, sms_dir):
        placed = api.place_order([(sku, 1)], phone=PHONE)
        saga, copies = confirmed_and_notify_queued(api, placed["id"], copies=2)

    # Three copies: the saga's own and two more; the worker's two pool processes start two
    # of them together, and the email takes the sink 3 s to accept.
    outputs = [result_wait(copy, 120, propagate=True) for copy in copies]
    order = api.wait_until_final(placed["id"], timeout=120)

    assert (order["status"], order["saga"]["status"]) == ("confirmed", "completed")
    assert all(output["notified"] == "order_confirmed" for output in outputs)
    assert sink.count(placed["id"]) == 1
    assert sms_count(sms_dir, placed["id"]) == 1
    rows = Notification.objects.filter(order_id=placed["id"]).order_by("channel")
    assert [(n.kind, n.channel, n.status) for n in rows] == [
        ("order_confirmed", "email", "sent"),
        ("order_confirmed", "sms", "sent"),
    ]
    # One attempt claimed and delivered both channels, under a lease from its claim.
    assert len({n.claim_token for n in rows}) == 1 and rows[0].claim_token is not None
    assert all(n.created_at < n.lease_until <= n.created_at + timedelta(seconds=60) for n in rows)
    # The race did happen: a copy found the message claimed and retried instead of sending.
    assert retried_for_a_live_claim(topology, saga.id)


def test_a_dead_senders_claim_is_taken_over_only_after_its_lease(
    api: Api, topology: Topology, sku: str, mail: tuple[SlowSmtpSink, Path]
) -> None:
    sink, sms_dir = mail
    sink.delay = 0
    make_product(sku, on_hand=5)
    dead = uuid.uuid4()
    with notifications_down_then_on(topology, sink, sms_dir):
        placed = api.place_order([(sku, 1)])
        saga, _ = confirmed_and_notify_queued(api, placed["id"], copies=0)
        # An attempt claimed the email and died (SIGKILL: no errback, no release).
        claimed = Notification.objects.create(
            saga_id=saga.id,
            order_id=placed["id"],
            kind=Notification.Kind.ORDER_CONFIRMED,
            channel=Notification.Channel.EMAIL,
            recipient="buyer@example.com",
            subject="Your order is confirmed",
            body=f"Your order {placed['id']} is confirmed.",
            status=Notification.Status.SENDING,
            claim_token=dead,
            lease_until=timezone.now() + timedelta(minutes=10),
        )

    # While its lease holds, the saga's own notify message keeps away and retries.
    wait_for(lambda: retried_for_a_live_claim(topology, saga.id), timeout=60, what="notify to meet the live claim")
    assert sink.count(placed["id"]) == 0
    assert api.order(placed["id"])["saga"]["status"] == "running"
    # The lease runs out: the next retry takes the claim over and sends.
    Notification.objects.filter(pk=claimed.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    order = api.wait_until_final(placed["id"], timeout=120)

    assert (order["status"], order["saga"]["status"]) == ("confirmed", "completed")
    [row] = Notification.objects.filter(order_id=placed["id"])
    assert row.status == "sent" and row.claim_token not in (None, dead)
    assert sink.count(placed["id"]) == 1


def test_a_sender_killed_mid_send_has_its_claim_taken_over_before_its_lease_ends(
    api: Api, topology: Topology, sku: str, mail: tuple[SlowSmtpSink, Path]
) -> None:
    """The notifications worker is SIGKILLed while its email is held at the mail server.
    Its claim's lease outlasts the task's hard time limit (15 s here, 30 s in production),
    but the copy the broker hands back sees the claim's owner process is gone on this host
    (common.liveness) and takes the claim over at once: the saga does not wait out the
    lease (`make chaos`, 12-06: 20.9 s for such a kill, issue 11 asks 15)."""
    sink, sms_dir = mail
    sink.delay = 0
    sink.hold.set()
    make_product(sku, on_hand=5)
    with notifications_down_then_on(topology, sink, sms_dir):
        placed = api.place_order([(sku, 1)])
        confirmed_and_notify_queued(api, placed["id"], copies=0)
    wait_for(
        lambda: Notification.objects.filter(order_id=placed["id"], status="sending").exists(),
        timeout=60,
        what="the worker to claim the email and hold at the mail server",
    )
    dead = Notification.objects.get(order_id=placed["id"])
    worker = topology.processes["notifications"]
    worker.kill()  # SIGKILL the worker and its pool: no release, no errback, no ack
    killed_at = timezone.now()
    sink.hold.clear()
    sink.let_go.set()
    worker.start(sending_to(topology, sink, sms_dir))
    topology.wait_ready(["notifications"])

    order = api.wait_until_final(placed["id"], timeout=60)

    assert (order["status"], order["saga"]["status"]) == ("confirmed", "completed")
    row = Notification.objects.get(order_id=placed["id"])
    assert row.status == "sent" and row.claim_token != dead.claim_token and row.claimed_by != dead.claimed_by
    print(f"claim taken over {(row.sent_at - killed_at).total_seconds():.1f} s after the kill")
    assert row.sent_at < dead.lease_until  # before the dead claim's lease had run out
    assert sink.count(placed["id"]) == 1  # the killed attempt had sent nothing of it
