import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_datetime


class SagaStatus(models.TextChoices):
    RUNNING = "running"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    NEEDS_ATTENTION = "needs_attention"


# A saga in one of these states may still act (an operator may retry one that needs
# attention): its definition version must stay registered (saga.checks).
UNFINISHED_STATUSES = (SagaStatus.RUNNING, SagaStatus.COMPENSATING, SagaStatus.NEEDS_ATTENTION)


class StepPhase(models.TextChoices):
    FORWARD = "forward"
    COMPENSATION = "compensation"


class StepStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # The saga started compensating while its chain may have been at this step (the store
    # learns a chain's progress at the pivot and at its end): whether it committed is not
    # known yet. A later report settles it: succeeded (undone by the compensations),
    # refused, or failed.
    UNKNOWN = "unknown"
    # The step did nothing because the saga was compensating (a compensation's tombstone,
    # a cancelled order): not a failure of the step.
    REFUSED = "refused"
    # Kept for rows written before `unknown` existed: the saga compensated while this step
    # was in flight.
    CANCELLED = "cancelled"
    # A compensation the saga did not run: its forward step failed in a way it records as
    # final (a declined card: nothing was charged, and no copy will charge; Step.final_failures).
    NOT_NEEDED = "not_needed", "Not needed"


class SagaInstance(models.Model):
    """One run of a saga definition. Lives in the orders database, beside its order.

    Changed only by the coordinator (saga.publish, saga.progress, saga.failure,
    saga.sweeper, saga.operator), under `select_for_update` on this row. The `mark_*` methods change
    the state in memory; the caller saves it.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    definition = models.CharField(max_length=64)
    # The version of `definition` it started on and runs to its end on (saga.definition).
    # db_default: rows written without it (before versions, bench's bulk history) are 1.
    definition_version = models.PositiveIntegerField(default=1, db_default=1)
    order_id = models.UUIDField(unique=True)
    status = models.CharField(max_length=20, choices=SagaStatus.choices, default=SagaStatus.RUNNING)
    current_step = models.CharField(max_length=64, blank=True)
    # The message every step receives; steps add what they produce (amount, ids).
    context = models.JSONField(default=dict)
    # "failed" or "cancelled": what the compensation phase is for.
    outcome = models.CharField(max_length=16, blank=True)
    failure_step = models.CharField(max_length=64, blank=True)
    failure_type = models.CharField(max_length=120, blank=True)
    failure_reason = models.TextField(blank=True)
    # Set, in the pivot step's own transaction, when the pivot commits: from then on the
    # saga never compensates, however late the reports of earlier steps arrive.
    pivot_committed_at = models.DateTimeField(null=True, blank=True)
    # After the pivot, the definition's settlement (saga.settlement) makes the saga's
    # provisional effects final: sent in a batch at `settlement_sent_at` (sent again when
    # that is older than the settlement's deadline), recorded at `settled_at`.
    settlement_sent_at = models.DateTimeField(null=True, blank=True)
    settled_at = models.DateTimeField(null=True, blank=True)
    # Bumped each time a chain is (re)published, so task ids stay unique per publish.
    generation = models.PositiveIntegerField(default=0)
    # The trace of the request that placed the order (OpenTelemetry; empty with tracing
    # off): its id, to find it, and its W3C context (traceparent), under which every later
    # chain of this saga is published, so one order is one trace (saga.tracing).
    trace_id = models.CharField(max_length=32, blank=True)
    trace_context = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "updated_at"], name="saga_status_updated_idx"),
            # The admin's search by trace id (an exact match: no LIKE twin, common.indexes).
            models.Index(fields=["trace_id"], name="saga_trace_id_idx"),
            # The sweep's scan for sagas to settle: only those past the pivot and not yet settled.
            models.Index(
                fields=["pivot_committed_at"],
                name="saga_unsettled_idx",
                condition=models.Q(pivot_committed_at__isnull=False, settled_at__isnull=True),
            ),
        ]
        permissions = [
            ("retry_saga", "Can retry a saga from the step that failed or stalled"),
            ("compensate_saga", "Can compensate a saga now, before its pivot"),
        ]

    def __str__(self) -> str:
        return f"{self.definition} v{self.definition_version} {self.id} ({self.status})"

    @property
    def failure_fingerprint(self) -> str:
        """Exception type and step of the last failure: identical failures share it."""
        return fingerprint_of(self.failure_type, self.failure_step)

    def mark_resumed(self, phase: str) -> None:
        """Acting again in `phase` (running forward, or compensating) after it needed attention."""
        self.status = SagaStatus.RUNNING if phase == StepPhase.FORWARD else SagaStatus.COMPENSATING

    def mark_finished(self, status: str, *, at: datetime) -> None:
        """Ended `status` (completed or compensated) at `at`: no step is current any more."""
        self.status, self.current_step, self.finished_at = status, "", at

    def mark_compensating(self, *, outcome: str, failure_step: str, failure_type: str, reason: str) -> None:
        """Compensating because `failure_step` failed with `failure_type` (`reason`, the raw
        error, for operators) or was cancelled: `outcome` says which."""
        self.status = SagaStatus.COMPENSATING
        self.outcome = outcome
        self._set_failure(failure_step=failure_step, failure_type=failure_type, reason=reason)

    def mark_needs_attention(self, *, failure_step: str, failure_type: str, reason: str) -> None:
        """Stopped for an operator: `failure_step` failed and nothing may undo or skip it."""
        self.status = SagaStatus.NEEDS_ATTENTION
        self._set_failure(failure_step=failure_step, failure_type=failure_type, reason=reason)

    def _set_failure(self, *, failure_step: str, failure_type: str, reason: str) -> None:
        self.failure_step, self.failure_type, self.failure_reason = failure_step, failure_type, reason


FINGERPRINT_SEPARATOR = " @ "


def fingerprint_of(failure_type: str, failure_step: str) -> str:
    return f"{failure_type}{FINGERPRINT_SEPARATOR}{failure_step}" if failure_type or failure_step else ""


def fingerprint_parts(fingerprint: str) -> tuple[str, str]:
    """(failure type, failure step) of a fingerprint; ValueError if it is not one."""
    failure_type, separator, failure_step = fingerprint.partition(FINGERPRINT_SEPARATOR)
    if not separator:
        raise ValueError(f"not a failure fingerprint: {fingerprint!r}")
    return failure_type, failure_step


def _aware(value: Any) -> datetime | None:
    """An ISO time with its zone, as a worker writes it; None for anything else."""
    try:
        parsed = parse_datetime(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


class SagaStep(models.Model):
    """One step of one saga: its status, attempts, timing, Celery task id and last error."""

    # No index of its own: saga_step_unique_name starts with it (common.indexes).
    saga = models.ForeignKey(SagaInstance, on_delete=models.CASCADE, related_name="steps", db_index=False)
    phase = models.CharField(max_length=16, choices=StepPhase.choices)
    position = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=64)
    task_name = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # How often the recovery sweeper (or an operator) re-published this step.
    republished = models.PositiveIntegerField(default=0)
    celery_task_id = models.CharField(max_length=255, blank=True)
    # queued_at: when the saga published it (or the previous step finished); empty on a
    # running step whose publish was never tried (saga.publish._due_now: `never_sent`);
    # started_at/finished_at: as measured by the participant that ran it.
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True)
    last_error = models.TextField(blank=True)
    result = models.JSONField(default=dict, blank=True)

    class Meta:
        # "forward" sorts after "compensation": descending puts the forward steps first.
        ordering = ["-phase", "position"]
        constraints = [
            models.UniqueConstraint(fields=["saga", "name"], name="saga_step_unique_name"),
        ]
        indexes = [
            # The sweeper's scan: running steps past their deadline.
            models.Index(
                fields=["deadline_at"],
                name="saga_step_running_deadline_idx",
                condition=models.Q(status="running"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    @property
    def never_sent(self) -> bool:
        """Running, but its chain was never handed to the broker (the process that would
        have published it had found the broker away: saga.broker_latch)."""
        return self.status == StepStatus.RUNNING and self.queued_at is None

    def not_run_because(self, saga: "SagaInstance") -> str:
        """Why this step, still pending, will not run unless an operator retries `saga` (its
        own saga, passed in so that a list of steps costs no query each); "" if it may yet
        run. Pending alone says it is still to come: in a saga that stopped for an
        operator, or whose forward chain a compensation ended, it is not."""
        if self.status != StepStatus.PENDING:
            return ""
        if saga.status == SagaStatus.NEEDS_ATTENTION:
            return "the saga waits for an operator"
        if self.phase == StepPhase.FORWARD and saga.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED):
            return "the saga compensated instead"
        return ""

    @property
    def duration_ms(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds() * 1000
        return None

    # State transitions. Each changes this row in memory; the caller, holding its saga's
    # row lock, saves it (saga.store). A step no longer running has no deadline: the
    # sweeper's scan reads only running steps past theirs.

    def mark_running(self, *, task_id: str, queued_at: datetime, deadline_at: datetime) -> None:
        """Published (as task `task_id`) at `queued_at`, to report back by `deadline_at`."""
        self.status = StepStatus.RUNNING
        self.celery_task_id = task_id
        self.queued_at, self.deadline_at, self.finished_at = queued_at, deadline_at, None

    def mark_republished(self, *, task_id: str, at: datetime, segment_seconds: float) -> None:
        """Published again at `at`, as a new attempt (by the sweeper or an operator). Its
        deadline, `segment_seconds` at first, doubles with each re-publish, so a slow
        participant is not flooded."""
        self.republished += 1
        self.attempts += 1
        deadline_at = at + timedelta(seconds=segment_seconds * 2**self.republished)
        self.mark_running(task_id=task_id, queued_at=at, deadline_at=deadline_at)

    def mark_succeeded(self, record: Mapping[str, Any] | None = None, *, queued_at: datetime | None = None) -> None:
        """Committed. With the participant's `record` of it (common.steps: times, attempt,
        worker, task id, output), those are the record's (`queued_at`: when the step
        before it finished); without one, it finished when last known to, or now."""
        self.status, self.deadline_at = StepStatus.SUCCEEDED, None
        if record is None:
            self.finished_at = self.finished_at or timezone.now()
        else:
            self.finished_at = None  # a cancel's time is not the step's
            self.take_record(record, queued_at=queued_at)

    def mark_committed(self, *, at: datetime, output: Mapping[str, Any], queued_at: datetime | None) -> None:
        """Committed at `at`, in the transaction running now (the pivot records itself),
        with `output`. Its record (worker, start) comes later and fills in the rest."""
        self.status, self.deadline_at, self.finished_at = StepStatus.SUCCEEDED, None, at
        self.queued_at = self.queued_at or queued_at
        self.started_at = self.started_at or at
        self.attempts = max(self.attempts, 1)
        self.result = dict(output)

    def mark_unknown(self) -> None:
        """Whether it committed is not known (no record of it; the saga compensates or
        its chain went on without one): not shown succeeded without an attempt or time."""
        self.status, self.deadline_at = StepStatus.UNKNOWN, None

    def mark_pending(self) -> None:
        """Never ran: its chain stopped before it."""
        self.status, self.finished_at = StepStatus.PENDING, None

    def mark_not_needed(self, *, at: datetime) -> None:
        """A compensation the saga decided at `at` not to run (StepStatus.NOT_NEEDED)."""
        self.status, self.finished_at, self.deadline_at = StepStatus.NOT_NEEDED, at, None

    def mark_failed(self, error: str, *, at: datetime, refused: bool = False, task_id: str | None = None) -> None:
        """Failed for good with `error` ("Type: message") at `at`; or, `refused`, did
        nothing because its saga was compensating. `task_id`: the failed task, when a
        failure report names it (the step may never have been marked running: nothing
        reports mid-chain)."""
        self.status = StepStatus.REFUSED if refused else StepStatus.FAILED
        self.last_error = error
        self.finished_at, self.deadline_at = at, None
        if task_id is not None:
            self.celery_task_id = task_id

    def take_attempt(self, attempt: Any) -> None:
        """The failed task's attempt number, worker and times, as its failure report
        carries them (saga.timeline); a report without them counts one attempt, and keeps
        the times the coordinator gave the step (it failed when the report was read)."""
        try:
            self.attempts = max(self.attempts, int(attempt["attempt"]), 1)
        except (TypeError, KeyError, ValueError):
            self.attempts = max(self.attempts, 1)
        if not isinstance(attempt, dict):
            return
        if isinstance(attempt.get("worker"), str):
            self.worker = attempt["worker"][:255]
        started, finished = _aware(attempt.get("started_at")), _aware(attempt.get("finished_at"))
        # Another host's clock may run a little ahead; anything else is not a time we show.
        if started and finished and started <= finished <= timezone.now() + timedelta(minutes=5):
            self.started_at, self.finished_at = started, finished

    def take_record(self, record: Mapping[str, Any], *, queued_at: datetime | None = None) -> None:
        """The timing, attempt, worker, task id and output of the participant's `record` of
        this step (common.steps), keeping what the record lacks."""
        started = parse_datetime(record["started_at"]) if isinstance(record.get("started_at"), str) else None
        finished = parse_datetime(record["finished_at"]) if isinstance(record.get("finished_at"), str) else None
        self.queued_at = self.queued_at or queued_at
        self.started_at = started or self.started_at
        self.finished_at = finished or self.finished_at or timezone.now()
        try:
            self.attempts = max(self.attempts, int(record.get("attempt") or 1))
        except (TypeError, ValueError):
            self.attempts = max(self.attempts, 1)
        self.worker = str(record.get("worker") or "")[:255]
        if isinstance(record.get("task_id"), str):
            self.celery_task_id = record["task_id"][:255]
        output = record.get("output")
        self.result = output if isinstance(output, dict) else self.result


class SagaAuditEntry(models.Model):
    """What an operator asked of a saga (retry, compensate), when, and what came of it.

    Written by `saga.operator` in the transaction of the action itself, refusals included
    (a second click on the same button is one), so the log and the saga never disagree.
    """

    class Action(models.TextChoices):
        RETRY = "retry"
        COMPENSATE = "compensate"

    class Outcome(models.TextChoices):
        DONE = "done"
        REFUSED = "refused"

    saga = models.ForeignKey(SagaInstance, on_delete=models.CASCADE, related_name="audit_entries")
    action = models.CharField(max_length=16, choices=Action.choices)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    detail = models.TextField()
    # Users live in the default database: referenced by id, and named as they were then.
    user_id = models.BigIntegerField(null=True, blank=True)
    username = models.CharField(max_length=150)
    status_before = models.CharField(max_length=20, choices=SagaStatus.choices)
    status_after = models.CharField(max_length=20, choices=SagaStatus.choices)
    failure_fingerprint = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "saga audit entries"

    def __str__(self) -> str:
        return f"{self.action} by {self.username}: {self.outcome}"
