"""A mail server's refusal or absence, as the notification step reports it.

The step's error reaches the worker's log, Flower's task events, the result backend and
the saga's last error (the admin): it must say what went wrong without the customer's
address. SMTP's own errors quote it (a 550 names the recipient; SMTPRecipientsRefused
holds it), so the step's error leaves them out of its chain too.
"""

import socket
import socketserver
import threading
import traceback
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.test import override_settings

from common.exceptions import TransientError
from notifications import channels, services
from notifications.models import Notification

pytestmark = pytest.mark.usefixtures("db_access")


class RefusingSmtp(socketserver.ThreadingTCPServer):
    """Just enough SMTP to refuse every recipient with a 550 that quotes the address."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Refuse)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Refuse(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 refusing ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line.strip().upper()
            if verb.startswith(b"RCPT"):
                address = line.split(b":", 1)[1].strip()
                self.wfile.write(b"550 5.1.1 " + address + b": recipient address rejected\r\n")
            elif verb.startswith(b"QUIT"):
                self.wfile.write(b"221 bye\r\n")
                return
            else:  # EHLO, MAIL, RSET, NOOP
                self.wfile.write(b"250 ok\r\n")


@pytest.fixture
def refusing_smtp() -> Iterator[int]:
    server = RefusingSmtp()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once it is closed


def smtp_to(port: int) -> override_settings:
    return override_settings(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend", EMAIL_HOST="127.0.0.1", EMAIL_PORT=port
    )


def shown(error: BaseException) -> str:
    """Everything Celery and the coordinator keep of an error: its text and its traceback."""
    return str(error) + "".join(traceback.format_exception(error))


def test_a_refused_recipient_is_reported_without_the_address(refusing_smtp: int) -> None:
    email = f"refused-{uuid.uuid4().hex[:12]}@example.com"
    with smtp_to(refusing_smtp), pytest.raises(TransientError) as raised:
        channels.send_email(to=email, subject="Your order", body="Thank you", reference="saga.order_confirmed")
    assert str(raised.value) == "email not sent: SMTPRecipientsRefused (550)"
    assert email not in shown(raised.value)
    assert "refused-" not in shown(raised.value)


def test_an_absent_mail_server_is_reported_by_its_errno() -> None:
    with smtp_to(closed_port()), pytest.raises(TransientError, match=r"ConnectionRefusedError \(errno \d+\)"):
        channels.send_email(
            to="someone@example.com", subject="Your order", body="Thank you", reference="saga.order_confirmed"
        )


def test_the_notification_step_fails_without_the_address_and_can_be_claimed_again(refusing_smtp: int) -> None:
    saga_id, email, phone = uuid.uuid4(), f"step-{uuid.uuid4().hex[:12]}@example.com", "+15550123456"
    with smtp_to(refusing_smtp), pytest.raises(TransientError) as raised:
        services.notification_send(
            saga_id=saga_id, order_id=uuid.uuid4(), outcome="confirmed", email=email, phone=phone, amount="9.00"
        )
    assert email not in shown(raised.value) and phone not in shown(raised.value)
    # Nothing was delivered: the claim is let go at once, for the retry.
    rows = Notification.objects.filter(saga_id=saga_id).values_list("channel", "status")
    assert dict(rows) == {"email": "pending", "sms": "pending"}


class StallingQuit(socketserver.ThreadingTCPServer):
    """A mail server that accepts the message (250 to DATA) and then never answers QUIT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StallQuit)
        self.received: list[bytes] = []
        self.stop = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _StallQuit(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 stalling ESMTP\r\n")
        while line := self.rfile.readline():
            verb = line.strip().upper()
            if verb.startswith(b"DATA"):
                self.wfile.write(b"354 go ahead\r\n")
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    self.server.received.append(chunk)
                self.wfile.write(b"250 accepted\r\n")
            elif verb.startswith(b"QUIT"):
                self.server.stop.wait(60)  # never answers while the test runs
                return
            else:  # EHLO, MAIL, RCPT
                self.wfile.write(b"250 ok\r\n")


def test_a_server_that_stalls_after_accepting_the_mail_is_a_delivery_not_a_failure() -> None:
    """Without a timeout, a QUIT that never gets its answer held the send until the task's
    soft time limit, which reads as a failed send: the claim was let go and the retry sent
    the email again. EMAIL_TIMEOUT ends the wait, and Django's backend takes a QUIT cut
    short as a closed connection."""
    assert 0 < settings.EMAIL_TIMEOUT < settings.CELERY_TASK_SOFT_TIME_LIMIT
    server = StallingQuit()
    sent: list[BaseException | None] = []

    def send() -> None:
        try:
            channels.send_email(
                to="someone@example.com", subject="Your order", body="Thank you", reference="saga.order_confirmed"
            )
            sent.append(None)
        except BaseException as error:
            sent.append(error)

    try:
        with smtp_to(server.server_address[1]), override_settings(EMAIL_TIMEOUT=1):
            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            sender.join(15)
        assert not sender.is_alive(), "the send still waits for the stalled server"
        assert sent == [None]
        assert any(b"Thank you" in chunk for chunk in server.received)
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
