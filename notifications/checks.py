"""Deploy check: a production deployment sends its customers' email, not files.

The settings default to the file backend so that `make run` and the bench work with no mail
server; with DEBUG off that default means every confirmation and failure notice is written
under EMAIL_FILE_PATH (personal data on disk) and no customer is told anything.
"""

from typing import Any

from django.conf import settings
from django.core import checks

# Django's backends that deliver nothing: each keeps or drops the message in this process.
UNDELIVERED = {
    "django.core.mail.backends.filebased.EmailBackend": "writes each email to a file under EMAIL_FILE_PATH",
    "django.core.mail.backends.console.EmailBackend": "prints each email to the process's output",
    "django.core.mail.backends.locmem.EmailBackend": "keeps each email in the process's memory",
    "django.core.mail.backends.dummy.EmailBackend": "drops each email",
}


@checks.register(checks.Tags.security, deploy=True)
def check_email_is_delivered(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """`notifications.W001`, under `check --deploy` with DEBUG off only."""
    what = UNDELIVERED.get(settings.EMAIL_BACKEND)
    if settings.DEBUG or what is None:
        return []
    return [
        checks.Warning(
            f"EMAIL_BACKEND={settings.EMAIL_BACKEND} {what}: no customer gets a confirmation or a failure notice",
            hint="set EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend and EMAIL_HOST, EMAIL_PORT "
            "(docs/OPERATIONS.md, 'Email and SMS')",
            id="notifications.W001",
        )
    ]
