from django.contrib import admin
from django.utils.html import format_html

from .models import SagaInstance, SagaStep


class ReadOnlyAdminMixin:
    """Records only the saga may change: visible to operators, never edited by hand."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class SagaStepInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = SagaStep
    extra = 0
    can_delete = False
    ordering = ["-phase", "position"]
    fields = [
        "phase",
        "position",
        "name",
        "status",
        "attempts",
        "queued_at",
        "started_at",
        "finished_at",
        "duration",
        "deadline_at",
        "worker",
        "celery_task_id",
        "last_error",
    ]
    readonly_fields = fields

    @admin.display(description="duration (ms)")
    def duration(self, step: SagaStep) -> str:
        return "" if step.duration_ms is None else f"{step.duration_ms:.0f}"


@admin.register(SagaInstance)
class SagaInstanceAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "status", "current_step", "order_link", "failure_step", "failure_type", "created_at"]
    list_filter = ["status", "definition", "failure_step", "failure_type", "created_at"]
    search_fields = ["=id", "=order_id", "context__email"]
    date_hierarchy = "created_at"
    inlines = [SagaStepInline]
    readonly_fields = [
        "id",
        "definition",
        "order_link",
        "status",
        "current_step",
        "outcome",
        "failure_step",
        "failure_type",
        "failure_reason",
        "generation",
        "context",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    fields = readonly_fields

    def has_view_permission(self, request, obj=None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm("saga.change_sagainstance")

    @admin.display(description="order")
    def order_link(self, saga: SagaInstance) -> str:
        return format_html('<a href="/admin/orders/order/{}/change/">{}</a>', saga.order_id, saga.order_id)
