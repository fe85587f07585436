import uuid

from django.db import models


class SagaStatus(models.TextChoices):
    RUNNING = "running"
    COMPLETED = "completed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    NEEDS_ATTENTION = "needs_attention"


class StepPhase(models.TextChoices):
    FORWARD = "forward"
    COMPENSATION = "compensation"


class StepStatus(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class SagaInstance(models.Model):
    """One run of a saga definition. Lives in the orders database, beside its order.

    Changed only by `saga.services`, under `select_for_update` on this row.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    definition = models.CharField(max_length=64)
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
    # Bumped each time a chain is (re)published, so task ids stay unique per publish.
    generation = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["status", "updated_at"], name="saga_status_updated_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.definition} {self.id} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)


class SagaStep(models.Model):
    """One step of one saga: its status, attempts, timing, Celery task id and last error."""

    saga = models.ForeignKey(SagaInstance, on_delete=models.CASCADE, related_name="steps")
    phase = models.CharField(max_length=16, choices=StepPhase.choices)
    position = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=64)
    task_name = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=StepStatus.choices, default=StepStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    celery_task_id = models.CharField(max_length=255, blank=True)
    # queued_at: when the saga published it (or the previous step finished);
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
    def duration_ms(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds() * 1000
        return None
