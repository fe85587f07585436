from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from audit.deliveries import read_deliveries
from audit.invariants import audit

FILE_BACKENDS = {
    "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
    "SMS_BACKEND": "notifications.channels.FileSmsBackend",
}


class Command(BaseCommand):
    help = (
        "Check the order saga's invariants across every service database: orders end confirmed, failed or "
        "cancelled; stock adds up (reserved is what orders in flight hold, a confirmed order's stock is sold once "
        "settled); no charge without a confirmed order or a refund; one notification per "
        "outcome; the saga log agrees with the participants. Exits 1 and names each violation."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--grace",
            type=float,
            default=300,
            help=(
                "seconds an order may still be pending, or a confirmed order's sale unsettled, before that counts "
                "as a violation (default 300)"
            ),
        )

        parser.add_argument(
            "--deliveries",
            action="store_true",
            help=(
                "also check what the customers were sent, from the files the file backends wrote (EMAIL_FILE_PATH, "
                "SMS_FILE_PATH: make run's default): one message of its outcome per channel, to its address"
            ),
        )

    def handle(self, *args: object, grace: float, deliveries: bool, **options: object) -> None:
        if grace < 0:
            raise CommandError("--grace must be zero or more seconds")
        delivered = None
        if deliveries:
            for setting, file_backend in FILE_BACKENDS.items():
                if getattr(settings, setting) != file_backend:
                    raise CommandError(
                        f"--deliveries reads the files {file_backend} writes, but {setting} is "
                        f"{getattr(settings, setting)}"
                    )
            delivered = read_deliveries(Path(settings.EMAIL_FILE_PATH), Path(settings.SMS_FILE_PATH))
        violations = audit(grace=timedelta(seconds=grace), deliveries=delivered)
        for violation in violations:
            self.stdout.write(f"VIOLATION {violation}")
        if violations:
            raise CommandError(f"{len(violations)} violation(s)")
        self.stdout.write(self.style.SUCCESS("saga audit: no violations"))
