"""The shape every saga participant task shares.

A participant task receives the saga context (a small JSON dict), validates it, calls
one service, and returns the context plus what it produced. It appends its own timing
and output to the context's `_steps` list, which travels down the chain to the step
that reports to the coordinator (saga.engine); the coordinator stores each entry on its
step (queue wait vs work time). Underscored keys are never part of the saga's state.

Retry policy lives here, on the task: transient errors (a provider hiccup, a dropped
database connection) retry with exponential backoff and jitter; business failures
(`StepFailed`) are never retried and make the saga compensate.
"""

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from .exceptions import InvalidMessage, TransientError
from .signing import context_verify

RETRYABLE = (TransientError, OperationalError, InterfaceError)
# A chain is a handful of steps; the cap only keeps a malformed context from growing.
MAX_TIMELINE = 16


def require_uuid(ctx: Mapping[str, Any], field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(ctx[field]))
    except (KeyError, ValueError, TypeError):
        raise InvalidMessage(f"message field {field!r} must be a UUID, got {ctx.get(field)!r}") from None


def require_str(ctx: Mapping[str, Any], field: str, *, max_length: int = 255) -> str:
    value = ctx.get(field)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise InvalidMessage(f"message field {field!r} must be a non-empty string, got {value!r}")
    return value


def saga_step_task(
    name: str, *, max_retries: int = 5, compensation: bool = False, **options: Any
) -> Callable[[Callable[..., dict[str, Any]]], Any]:
    """Declare a participant task: `fn(ctx, **kwargs) -> output dict`.

    The wrapped function must be idempotent by its saga key (see common.idempotency).
    A compensation (or a step past the pivot) retries transient errors for
    SAGA_COMPENSATION_MAX_RETRIES: it must eventually succeed, or an operator must look.
    """
    if compensation:
        max_retries = settings.SAGA_COMPENSATION_MAX_RETRIES

    def decorator(fn: Callable[..., dict[str, Any]]) -> Any:
        @shared_task(
            name=name,
            bind=True,
            autoretry_for=RETRYABLE,
            retry_backoff=1,
            retry_backoff_max=settings.TASK_RETRY_BACKOFF_MAX,
            retry_jitter=True,
            max_retries=max_retries,
            **options,
        )
        def task(self: Any, ctx: Any, **kwargs: Any) -> dict[str, Any]:
            started_at = timezone.now()
            if not isinstance(ctx, dict):
                raise InvalidMessage(f"{name} expects a saga context object, got {type(ctx).__name__}")
            # Only for a saga the coordinator started, with the order as it was placed (issue 6).
            context_verify(ctx)
            output = fn(ctx, **kwargs)
            meta = {
                "task_id": self.request.id,
                "started_at": started_at.isoformat(),
                "finished_at": timezone.now().isoformat(),
                "attempt": self.request.retries + 1,
                "worker": self.request.hostname or "",
                "output": output,
            }
            earlier = ctx.get("_steps")
            earlier = earlier[-MAX_TIMELINE:] if isinstance(earlier, list) else []
            return {**ctx, **output, "_steps": [*earlier, meta]}

        task.__doc__ = fn.__doc__
        return task

    return decorator
