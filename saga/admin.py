"""The operator's console for sagas: find one, see why it failed, retry or compensate it.

The actions follow Django's own `delete_selected` (django/contrib/admin/actions.py): a
dedicated permission, a confirmation page that says what will happen to each saga, then
the action and a `message_user` report. The work and its audit entry are
`saga.operator.saga_retry` / `saga_compensate`, which check the saga's state again under
its row lock: a second click, or a second operator, is refused and recorded as such.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince
from django_celery_beat.models import ClockedSchedule, CrontabSchedule, IntervalSchedule, PeriodicTask, SolarSchedule
from django_celery_results.models import GroupResult, TaskResult

from common.admin_links import order_notifications_link, order_payments_link
from common.admin_mixins import DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin

from . import operator
from .definition import registered_versions
from .engine import task_id_for
from .models import SagaAuditEntry, SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus, fingerprint_of
from .publish import OUTCOME_CANCELLED
from .selectors import failure_fingerprint_counts, saga_version_counts, sagas_with_fingerprints

if TYPE_CHECKING:
    from .recovery import Held

# Rows the confirmation page describes one by one; beyond, it counts them by status.
PREVIEW_ROWS = 100
# Context fields the saga's page does not show: the customer's card token (the order's page
# leaves it out too). Steps still receive it; the admin is not a step.
HIDDEN_CONTEXT_FIELDS = frozenset({"payment_token"})
HIDDEN = "(hidden)"


class SagaPartInline(ReadOnlyAdminMixin):
    """A saga's steps and audit entries are part of the saga: whoever may see it sees them."""

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("saga.view_sagainstance") or request.user.has_perm("saga.change_sagainstance")


def flower_task_link(task_id: str, *, label: str = "") -> str:
    """A Celery task id, linked to its page in Flower when FLOWER_URL is set."""
    if not task_id:
        return "-"
    if not settings.FLOWER_URL:
        return task_id
    return format_html(
        '<a href="{}/task/{}" title="{}" target="_blank" rel="noopener">{}</a>',
        settings.FLOWER_URL,
        task_id,
        task_id,
        label or task_id,
    )


def trace_url(trace_id: str) -> str:
    return settings.TRACE_URL_TEMPLATE.format(trace_id=trace_id) if trace_id and settings.TRACE_URL_TEMPLATE else ""


def clock(moment: datetime | None) -> str:
    """A time to the millisecond (the timeline's steps are milliseconds apart), with the
    full date and time zone on hover."""
    if moment is None:
        return "-"
    local = timezone.localtime(moment)
    return format_html('<span title="{}">{}</span>', local.isoformat(), local.strftime("%H:%M:%S.%f")[:-3])


LIVE_STATES = {"active": "Running on", "reserved": "Received by", "scheduled": "Waiting to retry on"}


def live_text(held: Held) -> str:
    """What a worker's answer about a step says, in words. It comes from a broadcast's
    replies, which whoever can publish to the broker can write: never used as a format."""
    return f"{LIVE_STATES.get(held.state, held.state + ' on')} {held.worker}"


def live_attempts(held: Held) -> str:
    """A held step's attempts so far, from the retry count its worker gives: the store
    hears of them only when the step ends (no message per attempt)."""
    if held.state == "active":
        return f"{held.retries + 1} (the last one running)"
    return f"{held.retries} failed so far" if held.retries else "0"


def live_steps(saga: SagaInstance) -> dict[str, Held]:
    """Step name -> (state, worker) for the steps of `saga`'s current chain that a live
    worker holds now (active, reserved, or scheduled for a retry). Asked only while the saga
    runs or compensates, and only when its page is shown: the store learns a chain's
    progress at the pivot and at its end (no message per step), so the workers are the ones
    who know which step a running chain is on. One broadcast (SAGA_INSPECT_TIMEOUT) per
    saga object: the page's fields and its timeline share the answer."""
    from .recovery import query_tasks  # the broker's app: only when a page asks

    if saga.status not in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        return {}
    if (cached := getattr(saga, "_live_steps", None)) is not None:
        return cached
    names = {task_id_for(saga.id, step.name, saga.generation): step.name for step in saga.steps.all()}
    live = {names[task_id]: where for task_id, where in query_tasks(list(names)).items() if task_id in names}
    saga._live_steps = live  # type: ignore[attr-defined]  # this page's answer, kept on its object
    return live


def chain_position(saga: SagaInstance, live: dict[str, Held]) -> str:
    """Where the saga is, as its page says it: the furthest step of its current phase that
    a worker holds (`live_steps`), with what the worker does with it; otherwise the step
    the store last knew of, which for a running chain is where it began or was recorded
    (the chain may be at any step from there to the pivot)."""
    steps = list(saga.steps.all())
    phase = next((s.phase for s in steps if s.name == saga.current_step), None)
    held = [s for s in steps if s.name in live and (phase is None or s.phase == phase)]
    if held:
        step = max(held, key=lambda s: s.position)
        said = live_text(live[step.name])
        return f"{step.name}: {said[:1].lower()}{said[1:]}"
    if saga.current_step and saga.status in (SagaStatus.RUNNING, SagaStatus.COMPENSATING):
        return f"{saga.current_step} or a step after it (no worker holds one now)"
    return saga.current_step or "-"


def retry_reason(task_id: str) -> str:
    """What the copy of a step that a worker holds for a retry last failed with, as the
    worker stored it (a retry's exception is kept in the result backend:
    CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED); empty if none is stored. The store hears
    of a step's attempts and error only when it ends, so without this a step that has
    failed for a minute shows no error while it waits to try again."""
    stored = TaskResult.objects.filter(task_id=task_id, status="RETRY").values_list("result", flat=True).first()
    try:
        error = json.loads(stored) if stored else {}
        message = error.get("exc_message") or ()
        text = " ".join(map(str, message)) if isinstance(message, list | tuple) else str(message)
        return f"{error['exc_type']}: {text}" if error.get("exc_type") else ""
    except (TypeError, ValueError, AttributeError):  # not a stored exception: say nothing
        return ""


def failure_step_text(saga: SagaInstance) -> str:
    """The failure step as the saga's page says it. A cancel or an operator's stop is no
    step's failure: its failure step is where the store knew the chain to be when it came
    (before the pivot, the chain's first step: the store hears of the rest at the pivot),
    so the page says that, and where the chain stopped once a refusal says so."""
    if not saga.failure_step or not (
        saga.outcome == OUTCOME_CANCELLED or saga.failure_type == operator.OPERATOR_COMPENSATED
    ):
        return saga.failure_step or "-"
    came = "the cancel" if saga.outcome == OUTCOME_CANCELLED else "the operator's stop"
    said = f"{saga.failure_step}, where the saga last knew its chain to be when {came} came"
    forward = sorted((s for s in saga.steps.all() if s.phase == StepPhase.FORWARD), key=lambda s: s.position)
    stopped = next((s.name for s in forward if s.status == StepStatus.REFUSED), None)
    return f"{said}; the chain stopped at {stopped}, which refused" if stopped else said


def step_state(step: SagaStep, live: dict[str, Held]) -> str:
    """What a timeline row says: the stored status, or, for a step of a running chain, what
    the workers say of it (`live_steps`)."""
    if step.name in live:
        return live_text(live[step.name])
    if step.never_sent:
        return "Not sent yet (the broker was away; the sweeper sends it)"
    if step.status == StepStatus.RUNNING:
        later = {s.name for s in step.saga.steps.all() if s.phase == step.phase and s.position > step.position}
        if later & live.keys():
            # Where the chain began (the store's record); it has moved on since.
            return "Passed (the chain is further on)"
        return "Running (no worker holds it now)"
    # Only a pending row needs its saga (a query per row unless the saga is cached).
    if step.status == StepStatus.PENDING and (because := step.not_run_because(step.saga)):
        return f"Not run ({because})"
    return step.get_status_display()


class SagaStepInline(SagaPartInline, admin.TabularInline):
    """The timeline: every step, then every compensation, in the order they run."""

    model = SagaStep
    extra = 0
    can_delete = False
    ordering = ["-phase", "position"]
    template = "admin/saga/sagainstance/compact_inline.html"
    verbose_name_plural = "timeline: steps, then compensations"
    fields = readonly_fields = (
        "phase",
        "name",
        "state",
        "attempts_so_far",
        "republished",
        "queued",
        "started",
        "finished",
        "queue_wait",
        "duration",
        "deadline",
        "worker",
        "task_link",
        "error",
    )
    live: dict[str, Held]
    generation = 0

    def get_formset(self, request: HttpRequest, obj: SagaInstance | None = None, **kwargs: Any) -> Any:
        # Inline instances are made per request: what the workers said is this page's.
        self.live = live_steps(obj) if obj is not None else {}
        self.generation = obj.generation if obj is not None else 0
        return super().get_formset(request, obj, **kwargs)

    @admin.display(description="status")
    def state(self, step: SagaStep) -> str:
        return step_state(step, getattr(self, "live", {}))

    @admin.display(description="attempts")
    def attempts_so_far(self, step: SagaStep) -> str:
        held = getattr(self, "live", {}).get(step.name)
        return live_attempts(held) if held is not None else str(step.attempts)

    @admin.display(description="queued")
    def queued(self, step: SagaStep) -> str:
        return clock(step.queued_at)

    @admin.display(description="started")
    def started(self, step: SagaStep) -> str:
        return clock(step.started_at)

    @admin.display(description="finished")
    def finished(self, step: SagaStep) -> str:
        return clock(step.finished_at)

    @admin.display(description="deadline")
    def deadline(self, step: SagaStep) -> str:
        return clock(step.deadline_at)

    @admin.display(description="duration (ms)")
    def duration(self, step: SagaStep) -> str:
        return "" if step.duration_ms is None else f"{step.duration_ms:.0f}"

    @admin.display(description="queue wait (ms)")
    def queue_wait(self, step: SagaStep) -> str:
        if step.queued_at and step.started_at:
            return f"{max((step.started_at - step.queued_at).total_seconds() * 1000, 0):.0f}"
        return ""

    @admin.display(description="last error")
    def error(self, step: SagaStep) -> str:
        if step.name in getattr(self, "live", {}):
            # A copy a worker holds may have failed and be waiting to try again.
            reason = retry_reason(step.celery_task_id or task_id_for(step.saga_id, step.name, self.generation))
            if reason:
                return f"retrying after {reason}"
        return step.last_error or "-"

    @admin.display(description="Celery task (Flower)")
    def task_link(self, step: SagaStep) -> str:
        # Task ids are <saga id>-<step>-g<generation>: on the saga's own page, the rest says it.
        return flower_task_link(step.celery_task_id, label=step.celery_task_id.removeprefix(f"{step.saga_id}-"))


class SagaAuditEntryInline(SagaPartInline, admin.TabularInline):
    model = SagaAuditEntry
    extra = 0
    can_delete = False
    template = "admin/saga/sagainstance/compact_inline.html"
    verbose_name_plural = "operator actions (audit)"
    fields = readonly_fields = ("when", "username", "action", "outcome", "status_before", "status_after", "detail")

    @admin.display(description="when")
    def when(self, entry: SagaAuditEntry) -> str:
        return timezone.localtime(entry.created_at).strftime("%Y-%m-%d %H:%M:%S %Z")


class FailureFingerprintFilter(admin.SimpleListFilter):
    """Sagas that failed the same way: exception type @ step."""

    title = "failure fingerprint"
    parameter_name = "fingerprint"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(fingerprint, f"{fingerprint} ({n})") for fingerprint, n in failure_fingerprint_counts()[:50]]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not (fingerprint := self.value()):
            return queryset
        return queryset.filter(pk__in=sagas_with_fingerprints([fingerprint]).values("pk"))


class DefinitionVersionFilter(admin.SimpleListFilter):
    """Sagas by definition version, each with how many unfinished sagas still run on it:
    what tells an operator whether an old version may be retired (docs/OPERATIONS.md,
    "Changing a saga"). Registered versions with none left are listed too, with 0."""

    title = "definition version (unfinished sagas)"
    parameter_name = "version"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        counts = saga_version_counts()
        registered = {(name, v) for name, versions in registered_versions().items() for v in versions}
        return [
            (f"{name}:{version}", f"{name} v{version} ({counts.get((name, version), 0)} unfinished)")
            for name, version in sorted({*counts, *registered})
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        name, _, version = value.rpartition(":")
        if not version.isdigit():
            return queryset.none()
        return queryset.filter(definition=name, definition_version=int(version))


@admin.register(SagaInstance)
class SagaInstanceAdmin(DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "status",
        "version",
        "stored_step",
        "age",
        "step_attempts",
        "last_error",
        "fingerprint",
        "order_link",
        "created_at",
    ]
    list_filter = [
        "status",
        DefinitionVersionFilter,
        FailureFingerprintFilter,
        "current_step",
        "failure_step",
        "created_at",
        "definition",
    ]
    search_fields = ["=id", "=order_id", "=trace_id", "context__email"]
    date_hierarchy = "created_at"
    inlines = [SagaStepInline, SagaAuditEntryInline]
    actions = ["retry_sagas", "retry_same_failure", "compensate_sagas"]
    change_form_template = "admin/saga/sagainstance/change_form.html"
    fieldsets = [
        (None, {"fields": ["id", "definition", "definition_version", "status", "position", "generation", "age"]}),
        ("Links", {"fields": ["order_link", "payments_link", "notifications_link", "trace_link", "trace_id"]}),
        (
            "Why it failed",
            {"fields": ["fingerprint", "failure_step_shown", "failure_type", "failure_reason", "outcome"]},
        ),
        (
            "Times",
            {
                "fields": [
                    "created_at",
                    "updated_at",
                    "finished_at",
                    "pivot_committed_at",
                    "settlement_sent_at",
                    "settled_at",
                ]
            },
        ),
        ("Context (what every step receives)", {"fields": ["context_shown"], "classes": ["collapse"]}),
    ]
    readonly_fields = [str(field) for _, options in fieldsets for field in options["fields"]]

    def has_view_permission(self, request, obj=None) -> bool:
        return super().has_view_permission(request, obj) or request.user.has_perm("saga.change_sagainstance")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("saga.retry_saga")

    def has_compensate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("saga.compensate_saga")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        steps = SagaStep.objects.filter(saga=OuterRef("pk"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                current_attempts=Subquery(steps.filter(name=OuterRef("current_step")).values("attempts")[:1]),
                latest_error=Subquery(
                    steps.exclude(last_error="").order_by("-finished_at", "-id").values("last_error")[:1]
                ),
            )
        )

    # --- Columns and fields ---------------------------------------------------------

    @admin.display(description="version", ordering="definition_version")
    def version(self, saga: SagaInstance) -> str:
        return f"{saga.definition} v{saga.definition_version}"

    @admin.display(description="age", ordering="created_at")
    def age(self, saga: SagaInstance) -> str:
        return timesince(saga.created_at, saga.finished_at or timezone.now())

    @admin.display(description="step (as stored)", ordering="current_step")
    def stored_step(self, saga: SagaInstance) -> str:
        # One broadcast per saga would slow every list page: the list says what the store
        # knows, which for a running chain is where it began (its page asks the workers).
        return saga.current_step or "-"

    @admin.display(description="current step")
    def position(self, saga: SagaInstance) -> str:
        return chain_position(saga, live_steps(saga))

    @admin.display(description="attempts")
    def step_attempts(self, saga: SagaInstance) -> str:
        attempts = getattr(saga, "current_attempts", None)
        return "-" if attempts is None else str(attempts)

    @admin.display(description="last error")
    def last_error(self, saga: SagaInstance) -> str:
        error = getattr(saga, "latest_error", None) or ""
        if not error:
            return "-"
        short = error if len(error) <= 80 else f"{error[:79]}…"
        return format_html('<span title="{}">{}</span>', error, short)

    @admin.display(description="failure fingerprint", ordering="failure_type")
    def fingerprint(self, saga: SagaInstance) -> str:
        return fingerprint_of(saga.failure_type, saga.failure_step) or "-"

    @admin.display(description="failure step")
    def failure_step_shown(self, saga: SagaInstance) -> str:
        return failure_step_text(saga)

    @admin.display(description="order")
    def order_link(self, saga: SagaInstance) -> str:
        url = reverse("admin:orders_order_change", args=[saga.order_id])
        return format_html('<a href="{}">{}</a>', url, saga.order_id)

    @admin.display(description="payments")
    def payments_link(self, saga: SagaInstance) -> str:
        return order_payments_link(saga.order_id, "payment and refund of this order")

    @admin.display(description="notifications")
    def notifications_link(self, saga: SagaInstance) -> str:
        return order_notifications_link(saga.order_id, "notifications of this order")

    @admin.display(description="context")
    def context_shown(self, saga: SagaInstance) -> str:
        """The context without the customer's card token, as the order's page shows the
        order (docs/SECURITY.md): an operator needs the ids, items and total, never the card."""
        shown = {k: HIDDEN if k in HIDDEN_CONTEXT_FIELDS else v for k, v in (saga.context or {}).items()}
        return format_html("<pre>{}</pre>", json.dumps(shown, indent=2, sort_keys=True, default=str))

    @admin.display(description="trace")
    def trace_link(self, saga: SagaInstance) -> str:
        url = trace_url(saga.trace_id)
        if not url:
            return "- (tracing was off when the order was placed)" if not saga.trace_id else saga.trace_id
        return format_html('<a href="{}" target="_blank" rel="noopener">open the trace</a>', url)

    # --- Buttons on the saga page -----------------------------------------------------

    def get_urls(self) -> list:
        info = self.opts.app_label, self.opts.model_name
        return [
            path(
                "<path:object_id>/retry/",
                self.admin_site.admin_view(self.retry_view),
                name="{}_{}_retry".format(*info),
            ),
            path(
                "<path:object_id>/compensate/",
                self.admin_site.admin_view(self.compensate_view),
                name="{}_{}_compensate".format(*info),
            ),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "can_retry": self.has_retry_permission(request),
            "can_compensate": self.has_compensate_permission(request),
        }
        return super().change_view(request, object_id, form_url, extra_context)

    def retry_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._object_operation(request, object_id, "retry")

    def compensate_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        return self._object_operation(request, object_id, "compensate")

    def _object_operation(self, request: HttpRequest, object_id: str, operation: str) -> HttpResponse:
        # The page shows the saga (its status, step, failure and plan): the action's
        # permission alone, without the view permission, is not enough to read it.
        if not (OPERATIONS[operation].allowed(self, request) and self.has_view_permission(request)):
            raise PermissionDenied
        saga = self.get_object(request, object_id)
        if saga is None:
            raise Http404(f"no saga {object_id}")
        change_url = reverse("admin:saga_sagainstance_change", args=[saga.pk])
        if request.method == "POST" and request.POST.get("post"):
            self._run(request, operation, [saga.pk])
            return HttpResponseRedirect(change_url)
        return self._confirmation(request, operation, [saga], cancel_url=change_url)

    # --- Actions ------------------------------------------------------------------------

    @admin.action(permissions=["retry"], description="Retry selected sagas from the step that failed or stalled")
    def retry_sagas(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        return self._action(request, queryset, "retry")

    @admin.action(permissions=["compensate"], description="Compensate selected sagas now (before their pivot)")
    def compensate_sagas(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        return self._action(request, queryset, "compensate")

    @admin.action(permissions=["retry"], description="Retry every saga that failed the same way as the selected")
    def retry_same_failure(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        fingerprints = sorted({saga.failure_fingerprint for saga in queryset[: settings.SAGA_BULK_RETRY_LIMIT]} - {""})
        if request.POST.get("post"):
            # The failures the confirmation showed: a selected saga retried and failed
            # another way since then must not bring its new failure's sagas along.
            shown = sorted(set(request.POST.getlist("fingerprint")) - {""})
            entries, remaining = operator.saga_retry_by_fingerprint(fingerprints=shown, user=request.user)
            self._report(request, "retry", entries, remaining=remaining)
            return None
        targets = sagas_with_fingerprints(fingerprints).filter(status=SagaStatus.NEEDS_ATTENTION).order_by("created_at")
        return self._confirmation(
            request,
            "retry",
            targets,
            action="retry_same_failure",
            selected=queryset,
            fingerprints=fingerprints,
        )

    def _action(self, request: HttpRequest, queryset: QuerySet, operation: str) -> HttpResponse | None:
        queryset = queryset.order_by("created_at")
        if request.POST.get("post"):
            limit = settings.SAGA_BULK_RETRY_LIMIT
            ids = list(queryset.values_list("pk", flat=True)[: limit + 1])
            self._run(request, operation, ids[:limit], skipped=len(ids) > limit)
            return None
        return self._confirmation(request, operation, queryset, action=f"{operation}_sagas", selected=queryset)

    def _run(self, request: HttpRequest, operation: str, ids: Iterable[Any], *, skipped: bool = False) -> None:
        act = OPERATIONS[operation].service
        entries = []
        for saga_id in ids:
            try:
                entries.append(act(saga_id=saga_id, user=request.user))
            except SagaInstance.DoesNotExist:
                continue
        self._report(request, operation, entries, remaining=-1 if skipped else 0)

    def _report(self, request: HttpRequest, operation: str, entries: list[SagaAuditEntry], *, remaining: int) -> None:
        done = [e for e in entries if e.outcome == SagaAuditEntry.Outcome.DONE]
        refused = [e for e in entries if e.outcome == SagaAuditEntry.Outcome.REFUSED]
        past = OPERATIONS[operation].past

        def summary(items: list[SagaAuditEntry]) -> str:
            shown = "; ".join(f"{e.saga_id}: {e.detail}" for e in items[:5])
            return shown + (f"; and {len(items) - 5} more" if len(items) > 5 else "")

        if done:
            self.message_user(request, f"{past.capitalize()} {_sagas(len(done))}: {summary(done)}", messages.SUCCESS)
        if refused:
            self.message_user(request, f"Not {past} {_sagas(len(refused))}: {summary(refused)}", messages.WARNING)
        if not entries:
            self.message_user(request, f"No saga was {past}: none of them needs it any more.", messages.WARNING)
        if remaining:
            more = f"{remaining} more" if remaining > 0 else "more"
            self.message_user(
                request,
                f"At most {settings.SAGA_BULK_RETRY_LIMIT} sagas are handled per click: {more} remain, "
                "run the action again.",
                messages.WARNING,
            )

    def _confirmation(
        self,
        request: HttpRequest,
        operation: str,
        sagas: Iterable[SagaInstance],
        *,
        action: str = "",
        selected: QuerySet | None = None,
        fingerprints: list[str] | None = None,
        cancel_url: str = "",
    ) -> TemplateResponse:
        """Say what the action would do to each saga, and ask (django.contrib.admin.actions)."""
        op = OPERATIONS[operation]
        if isinstance(sagas, QuerySet):
            by_status = sorted((row["status"], row["n"]) for row in sagas.values("status").annotate(n=Count("pk")))
            sagas = list(sagas[:PREVIEW_ROWS])
        else:
            sagas = list(sagas)
            by_status = sorted(Counter(saga.status for saga in sagas).items())
        total = sum(n for _, n in by_status)
        rows = []
        for saga in sagas[:PREVIEW_ROWS]:
            ok, text = op.preview(saga)
            rows.append({"saga": saga, "ok": ok, "text": text, "fingerprint": saga.failure_fingerprint})
        hidden: list[tuple[str, Any]] = []
        if action:
            # Posted back to the changelist, as delete_selected does, with the ids of the
            # selection as it is now, never select_across: that re-runs the list's filter at
            # the "yes", which takes in sagas begun since this page was shown (a "select all
            # running" compensate would stop orders placed in between). One more id than a
            # click handles, so the click can say that more remain.
            ids: QuerySet | list[Any] = [] if selected is None else selected.values_list("pk", flat=True)
            hidden = [("action", action), ("select_across", "0")]
            hidden += [(helpers.ACTION_CHECKBOX_NAME, pk) for pk in ids[: settings.SAGA_BULK_RETRY_LIMIT + 1]]
            hidden += [("fingerprint", fingerprint) for fingerprint in fingerprints or []]
        context = {
            **self.admin_site.each_context(request),
            "title": op.title,
            "subtitle": None,
            "opts": self.opts,
            "operation": operation,
            "op": op,
            "rows": rows,
            "actionable": any(row["ok"] for row in rows) or total > len(rows),
            "total": total,
            "more": total - len(rows),
            "by_status": by_status,
            "fingerprints": fingerprints,
            "hidden": hidden,
            "cancel_url": cancel_url,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/saga/sagainstance/operator_confirmation.html", context)


def _sagas(n: int) -> str:
    return f"{n} saga" if n == 1 else f"{n} sagas"


class Operation:
    def __init__(
        self,
        *,
        service: Callable[..., SagaAuditEntry],
        allowed: Callable[[SagaInstanceAdmin, HttpRequest], bool],
        preview: Callable[[SagaInstance], tuple[bool, str]],
        title: str,
        question: str,
        confirm: str,
        past: str,
    ) -> None:
        self.service, self.allowed, self.preview = service, allowed, preview
        self.title, self.question, self.confirm, self.past = title, question, confirm, past


def _retry_preview(saga: SagaInstance) -> tuple[bool, str]:
    plan = operator.saga_retry_check(saga)
    return plan.possible, plan.detail


def _compensate_preview(saga: SagaInstance) -> tuple[bool, str]:
    refusal = operator.saga_compensate_check(saga)
    if refusal:
        return False, refusal
    # A running chain may be past the step the store knows of (it hears of it at the pivot).
    where = (
        f"its chain is at {saga.current_step} or a step after it"
        if saga.status == SagaStatus.RUNNING
        else f"from {saga.current_step or saga.failure_step}"
    )
    return True, (
        f"compensate ({where}): every step up to the pivot is undone, "
        "the order fails and the customer is told (unless the order was confirmed meanwhile)"
    )


OPERATIONS = {
    "retry": Operation(
        service=operator.saga_retry,
        allowed=SagaInstanceAdmin.has_retry_permission,
        preview=_retry_preview,
        title="Retry sagas",
        question="Each saga below is retried from the step that failed or stalled; its steps are idempotent, so "
        "what already happened is not done twice.",
        confirm="Yes, retry",
        past="retried",
    ),
    "compensate": Operation(
        service=operator.saga_compensate,
        allowed=SagaInstanceAdmin.has_compensate_permission,
        preview=_compensate_preview,
        title="Compensate sagas now",
        question="Each saga below stops and compensates now: whatever it did is undone, its order fails and the "
        "customer is told. This cannot be taken back.",
        confirm="Yes, compensate",
        past="compensated",
    ),
}


# --- The libraries' records: read-only ---------------------------------------------------
# Celery's results (the chains' records the coordinator drains) and beat's schedule (the
# sweep) are registered by their libraries with add, edit, delete and bulk actions. The
# web's database role only reads them (orders_project.db_roles: beat and the workers write
# them), so each of those was a 500 for a superuser. Registered here, in an app that loads
# after both libraries, with their own list pages and no way to change a row.
LIBRARY_MODELS = (
    PeriodicTask,
    IntervalSchedule,
    CrontabSchedule,
    SolarSchedule,
    ClockedSchedule,
    TaskResult,
    GroupResult,
)


def _read_only(model_admin: type[admin.ModelAdmin]) -> type[admin.ModelAdmin]:
    """`model_admin` with no add, change or delete, and none of its bulk actions (enable,
    disable, run a periodic task): actions without their own permission would be offered."""
    return type(
        f"ReadOnly{model_admin.__name__}", (DeclaredFiltersOnlyMixin, ReadOnlyAdminMixin, model_admin), {"actions": ()}
    )


for _model in LIBRARY_MODELS:
    _library_admin = type(admin.site.get_model_admin(_model))
    admin.site.unregister(_model)
    admin.site.register(_model, _read_only(_library_admin))
