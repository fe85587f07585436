from django.contrib import admin
from django.http import HttpRequest

from .admin_mixins import DeclaredFiltersOnlyMixin
from .models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(DeclaredFiltersOnlyMixin, admin.ModelAdmin):
    """Staff see who holds tokens and revoke them (delete). Tokens are issued through the
    API or `manage.py api_token_create`, which show the key once; the admin never can."""

    list_display = ["user", "created_at", "expires_at"]
    list_filter = ["created_at", "expires_at"]
    search_fields = ["user__username"]
    fields = readonly_fields = ("user", "created_at", "expires_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ApiToken | None = None) -> bool:
        return False
