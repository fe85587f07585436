"""Django's migrate, then the process roles' privileges on the database just migrated.

Run as the database's owner (the URLs `migrate` is given), it grants each process role
named in DATABASE_PROCESS_ROLES what orders_project.db_roles.POLICY allows it on that
database's tables, and nothing else: a table a migration creates is covered at once.
With DATABASE_PROCESS_ROLES empty (one role does everything) it is Django's migrate.
"""

from typing import Any

from django.conf import settings
from django.core.management.base import CommandError
from django.core.management.commands import migrate
from django.db import DatabaseError, connections

from orders_project.db_roles import POLICY, grant_process_roles


class Command(migrate.Command):
    help = f"{migrate.Command.help} Then grants the process roles (DATABASE_PROCESS_ROLES) their privileges."

    def handle(self, *args: Any, **options: Any) -> None:
        grants = settings.DATABASE_PROCESS_ROLES and not options.get("plan") and not options.get("check_unapplied")
        if grants:
            # Before migrating: a name misspelt, or a role not created yet, stopped the grants
            # halfway with a traceback after the migrations had run.
            _check_roles(options["database"], settings.DATABASE_PROCESS_ROLES)
        super().handle(*args, **options)
        if grants:
            statements = grant_process_roles(options["database"], settings.DATABASE_PROCESS_ROLES)
            if options["verbosity"] >= 2:
                self.stdout.write("\n".join(statements))


def _check_roles(alias: str, roles: dict[str, str]) -> None:
    """Refuse DATABASE_PROCESS_ROLES naming a process POLICY does not know, or a role the
    server does not have, with a message naming it."""
    if unknown := sorted(set(roles) - set(POLICY)):
        raise CommandError(
            f"DATABASE_PROCESS_ROLES names no process {', '.join(unknown)}: "
            f"the processes are {', '.join(sorted(POLICY))}"
        )
    try:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [sorted(set(roles.values()))])
            present = {name for (name,) in cursor.fetchall()}
    except DatabaseError as error:
        raise CommandError(f"cannot read the roles of database {alias}: {error}") from None
    if missing := sorted(set(roles.values()) - present):
        raise CommandError(
            f"DATABASE_PROCESS_ROLES names role(s) {', '.join(missing)}, "
            "which PostgreSQL does not have: create them first"
        )
