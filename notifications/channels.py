"""Delivery channels. Email goes through Django's email backend (EMAIL_BACKEND); SMS
through an SMS backend with the same shape (SMS_BACKEND), so a real provider plugs in
by dotted path."""

import json
import smtplib
from email.utils import parseaddr
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.core.mail import EmailMessage
from django.utils import timezone
from django.utils.module_loading import import_string

from common.exceptions import TransientError


class SmsBackend(Protocol):
    def send(self, *, to: str, body: str, reference: str) -> None:
        """Deliver `body` to `to`. `reference` names the message, the same in every copy
        (a provider's client reference, where it has one)."""


class FileSmsBackend:
    """Appends each SMS as a JSON line to SMS_FILE_PATH/sms.log: readable in development."""

    def send(self, *, to: str, body: str, reference: str) -> None:
        folder = Path(settings.SMS_FILE_PATH)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"at": timezone.now().isoformat(), "to": to, "reference": reference, "body": body})
        with open(folder / "sms.log", "a", encoding="utf-8") as log:
            log.write(line + "\n")


def message_id(reference: str) -> str:
    """The Message-ID header of the email named `reference`, in the sender's domain
    (DEFAULT_FROM_EMAIL may carry a display name: `Shop <orders@shop.example>`)."""
    _, at, domain = parseaddr(settings.DEFAULT_FROM_EMAIL)[1].rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii")  # a header is ASCII: xn-- for an IDN
    except UnicodeError:
        domain = ""
    return f"<{reference}@{domain if at and domain else 'localhost'}>"


def send_email(*, to: str, subject: str, body: str, reference: str) -> None:
    message = EmailMessage(
        subject, body, settings.DEFAULT_FROM_EMAIL, [to], headers={"Message-ID": message_id(reference)}
    )
    try:
        message.send(fail_silently=False)
    except (smtplib.SMTPException, OSError) as error:
        # The mail server being away is worth a retry; the task backs off. The error goes
        # into the worker's log, Flower's task events, the result backend and the saga's
        # last error: it names the kind of failure, never the address, and leaves out the
        # SMTP error it replaces, whose text often does (a 550 quotes the recipient,
        # SMTPRecipientsRefused holds it).
        raise TransientError(f"email not sent: {failure_kind(error)}") from None


def failure_kind(error: BaseException) -> str:
    """The class of a delivery error and its SMTP reply code or errno, without its text."""
    code = getattr(error, "smtp_code", None) if isinstance(error, smtplib.SMTPException) else None
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = sorted({reply[0] for reply in error.recipients.values() if isinstance(reply, tuple) and reply})
        code = "/".join(str(c) for c in codes) or None
    if isinstance(error, OSError) and error.errno is not None:
        code = f"errno {error.errno}"
    return f"{type(error).__name__} ({code})" if code else type(error).__name__


def send_sms(*, to: str, body: str, reference: str) -> None:
    backend: SmsBackend = import_string(settings.SMS_BACKEND)()
    backend.send(to=to, body=body, reference=reference)
