from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from saga.checks import refusal, stored_version_counts
from saga.definition import registered_versions


class Command(BaseCommand):
    help = (
        "Each saga definition version: whether this deployment registers it (SAGA_DEFINITIONS), whether new "
        "sagas start on it, and how many unfinished sagas (running, compensating, needing attention) still run "
        "on it. Exits 1 when a version in use is not registered: a deploy with these settings would strand "
        "those sagas. A version may leave SAGA_DEFINITIONS once it shows 0."
    )
    # The check it makes is this command's whole point: say it in its own words.
    requires_system_checks = []

    def handle(self, *args: object, **options: object) -> None:
        try:
            registered = registered_versions()
        except ImproperlyConfigured as error:
            raise CommandError(str(error)) from None
        counts = stored_version_counts()
        rows = sorted({*counts, *((name, v) for name, versions in registered.items() for v in versions)})
        self.stdout.write(f"{'saga':<24} {'version':>7}  {'registered':<18} {'unfinished sagas':>16}")
        for name, version in rows:
            versions = registered.get(name, [])
            state = ("yes, new sagas" if version == versions[-1] else "yes") if version in versions else "NO"
            self.stdout.write(f"{name:<24} {version:>7}  {state:<18} {counts.get((name, version), 0):>16}")
        missing = [(n, v, c) for (n, v), c in sorted(counts.items()) if v not in registered.get(n, [])]
        if missing:
            raise CommandError(refusal(missing))
        self.stdout.write(self.style.SUCCESS("saga versions: every version in use is registered"))
