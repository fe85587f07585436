"""Delivery channels. Email goes through Django's email backend (EMAIL_BACKEND); SMS
through an SMS backend with the same shape (SMS_BACKEND), so a real provider plugs in
by dotted path."""

import json
import smtplib
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.core.mail import send_mail
from django.utils import timezone
from django.utils.module_loading import import_string

from common.exceptions import TransientError


class SmsBackend(Protocol):
    def send(self, *, to: str, body: str) -> None: ...


class FileSmsBackend:
    """Appends each SMS as a JSON line to SMS_FILE_PATH/sms.log: readable in development."""

    def send(self, *, to: str, body: str) -> None:
        folder = Path(settings.SMS_FILE_PATH)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"at": timezone.now().isoformat(), "to": to, "body": body})
        with open(folder / "sms.log", "a", encoding="utf-8") as log:
            log.write(line + "\n")


def send_email(*, to: str, subject: str, body: str) -> None:
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, [to], fail_silently=False)
    except (smtplib.SMTPException, OSError) as error:
        # The mail server being away is worth a retry; the task backs off.
        raise TransientError(f"email to {to} not sent: {error}") from error


def send_sms(*, to: str, body: str) -> None:
    backend: SmsBackend = import_string(settings.SMS_BACKEND)()
    backend.send(to=to, body=body)
