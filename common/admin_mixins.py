"""What every service's admin shares. Kept in `common`, not in the coordinator's admin, so
that a participant's admin does not import the saga (pyproject.toml, [tool.importlinter])."""

from django.http import HttpRequest


class ReadOnlyAdminMixin:
    """Records only their service's code may change (the saga's steps write them): visible to
    operators, never added, edited or deleted by hand."""

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
