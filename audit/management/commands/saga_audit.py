from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from audit.invariants import audit


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

    def handle(self, *args: object, grace: float, **options: object) -> None:
        if grace < 0:
            raise CommandError("--grace must be zero or more seconds")
        violations = audit(grace=timedelta(seconds=grace))
        for violation in violations:
            self.stdout.write(f"VIOLATION {violation}")
        if violations:
            raise CommandError(f"{len(violations)} violation(s)")
        self.stdout.write(self.style.SUCCESS("saga audit: no violations"))
