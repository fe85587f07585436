"""Django's createsuperuser, plus the password validators for --noinput.

Django checks AUTH_PASSWORD_VALIDATORS only when it prompts for the password; with
--noinput (DJANGO_SUPERUSER_PASSWORD), which `make run` and compose's migrate job use, it
does not. This command (found first: `common` leads INSTALLED_APPS) applies them there
too, and with DEBUG off also refuses the repository's public local default.
"""

import os
from typing import Any

from django.conf import settings
from django.contrib.auth.management.commands import createsuperuser
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from orders_project.security import PUBLIC_DEFAULT_MARKER


class Command(createsuperuser.Command):
    help = f"{createsuperuser.Command.help} A password from DJANGO_SUPERUSER_PASSWORD must pass the validators."

    def handle(self, *args: Any, **options: Any) -> str | None:
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        # An empty one too: Django stores a working hash of "" (the login forms refuse it,
        # `check_password` does not).
        if not options["interactive"] and password is not None:
            self._check_password(password, options)
        return super().handle(*args, **options)

    def _check_password(self, password: str, options: dict[str, Any]) -> None:
        username_field = self.UserModel.USERNAME_FIELD  # type: ignore[attr-defined]  # every user model has it
        username = options.get(username_field) or os.environ.get(f"DJANGO_SUPERUSER_{username_field.upper()}", "")
        email = options.get("email") or os.environ.get("DJANGO_SUPERUSER_EMAIL", "")
        candidate = self.UserModel(**{username_field: username, "email": email})
        try:
            validate_password(password, user=candidate)  # type: ignore[arg-type]
        except ValidationError as error:
            raise CommandError(f"DJANGO_SUPERUSER_PASSWORD is refused: {' '.join(error.messages)}") from None
        if not settings.DEBUG and PUBLIC_DEFAULT_MARKER.search(password):
            raise CommandError(
                "DJANGO_SUPERUSER_PASSWORD is refused: it is a public default from this repository and DEBUG is off."
            )
