"""Django's migrate, then the process roles' privileges on the database just migrated.

Run as the database's owner (the URLs `migrate` is given), it grants each process role
named in DATABASE_PROCESS_ROLES what orders_project.db_roles.POLICY allows it on that
database's tables, and nothing else: a table a migration creates is covered at once.
With DATABASE_PROCESS_ROLES empty (one role does everything) it is Django's migrate.
"""

from typing import Any

from django.conf import settings
from django.core.management.commands import migrate

from orders_project.db_roles import grant_process_roles


class Command(migrate.Command):
    help = f"{migrate.Command.help} Then grants the process roles (DATABASE_PROCESS_ROLES) their privileges."

    def handle(self, *args: Any, **options: Any) -> None:
        super().handle(*args, **options)
        if settings.DATABASE_PROCESS_ROLES and not options.get("plan") and not options.get("check_unapplied"):
            statements = grant_process_roles(options["database"], settings.DATABASE_PROCESS_ROLES)
            if options["verbosity"] >= 2:
                self.stdout.write("\n".join(statements))
