"""What every service's admin shares. Kept in `common`, not in the coordinator's admin, so
that a participant's admin does not import the saga (pyproject.toml, [tool.importlinter])."""

from typing import Any

from django.contrib.admin import SimpleListFilter
from django.db.models.constants import LOOKUP_SEP
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


class DeclaredFiltersOnlyMixin:
    """A list page filters by its query string only on what it offers as filters.

    Django's admin accepts a filter on any of the model's own fields from the query string
    (`?payment_token__startswith=tok_v`), whether or not the page shows the field. A staff
    account that may only view a list could then read a hidden value a character at a
    time, by whether the list comes back empty. Here a lookup must be a filter of
    `list_filter`, `date_hierarchy` or `filter_lookups` (the filters the project's own links
    use), or a lookup on one (`status__exact`, `saga__status__in`); anything else is
    Django's 400 (DisallowedModelAdminLookup)."""

    filter_lookups: tuple[str, ...] = ()

    def lookup_allowed(self, lookup: str, value: Any, request: HttpRequest | None = None) -> bool:
        offered = {*self.filter_lookups, getattr(self, "date_hierarchy", None)}
        for item in self.get_list_filter(request) if request is not None else self.list_filter:  # type: ignore[attr-defined]
            if isinstance(item, type) and issubclass(item, SimpleListFilter):
                offered.add(item.parameter_name)
            else:
                offered.add(item[0] if isinstance(item, (list, tuple)) else item)
        if not any(lookup == name or lookup.startswith(f"{name}{LOOKUP_SEP}") for name in offered if name):
            return False
        return super().lookup_allowed(lookup, value, request)  # type: ignore[misc]
