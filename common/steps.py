"""The shape every saga participant task shares.

A participant task receives the saga context (a small JSON dict), validates it, calls
one service, and returns the context plus what it produced. It appends its own timing
and output to the context's `_steps` list, which travels down the chain to the step
that reports to the coordinator (saga.engine); the coordinator stores each entry on its
step (queue wait vs work time). Underscored keys are never part of the saga's state.

Retry policy lives here, on the task: transient errors (a provider hiccup, a dropped
database connection) retry with exponential backoff and jitter; business failures
(`StepFailed`) are never retried and make the saga compensate. A `BusinessFailure` is the
task's `throws`: Celery still stores it and calls the step's errback, but logs it as
"raised expected" at INFO, without a traceback. A declined card is how a saga is meant to
fail, not an error an operator must read (each was 20 lines at ERROR); a malformed or
forged message (`InvalidMessage`) still is.

A participant acts only on what its message authorises (common.signing): the
coordinator's authority for this task, over this context. The context it returns is
sealed for the next step.

Nothing reusable or personal leaves a step through Celery's own reporting. The context
must still travel whole to the next step (a chain passes a step's return value as the
next one's argument), so what changes is how Celery *shows* it:
- the return value is a `SagaContext`, whose repr (what Celery logs at INFO as "Task ...
  succeeded in ...: <repr>" and sends to Flower in the task-succeeded event, both through
  `saferepr` in celery.app.trace) shows ids and outcomes only. It is a Mapping but not a
  dict, so `saferepr` calls its repr instead of walking its items; kombu's JSON encoder
  sends it as the plain object it wraps;
- a failed or retried step's stored arguments (the result backend, extended results) are
  its request's `argsrepr`, which the step replaces with its ids and the chain's timing
  (`_steps`): the coordinator reads that timeline (saga.failure._failure_from_backend);
- a retry keeps the message's `argsrepr`/`kwargsrepr` (Celery would otherwise render the
  whole context, and the authority, again for the retried message's events).
"""

import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from celery import Task, shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone
from kombu.utils.json import register_type

from .exceptions import BusinessFailure, InvalidMessage, TransientError
from .signing import AUTHORITY_KWARG, FAILURE_SEAL_FIELD, SEAL_FIELD, authority_verify, failure_seal, seal

RETRYABLE = (TransientError, OperationalError, InterfaceError)
# Sent (True) to a chain's last step, whose result is the chain's record (saga.engine).
RECORD_KWARG = "record"
# A chain is a handful of steps; the cap only keeps a malformed context from growing.
MAX_TIMELINE = 16
# Where a step's attempt keeps its start on the task's request, for its failure report
# (saga.timeline): a failed step is shown with the times of the attempt that failed.
STARTED_AT_ATTR = "saga_step_started_at"
# Where a step keeps the order id of a message it verified (common.signing), for its failure
# report (saga.timeline): the coordinator's log lines name the order without a query.
VERIFIED_ORDER_ATTR = "saga_step_order_id"


# What a step's result shows in logs and events: ids and outcomes.
SHOWN_FIELDS = ("saga_id", "order_id", "outcome", "status", "payment_id", "refund", "notified", "decline_code")
TIMELINE_FIELDS = ("task_id", "started_at", "finished_at", "attempt", "worker", "output")


class SagaContext(Mapping[str, Any]):
    """A step's return value: the saga context, shown as its ids and outcomes only."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shown = " ".join(f"{k}={str(self._data[k])[:64]}" for k in SHOWN_FIELDS if self._data.get(k) not in (None, ""))
        return f"<saga context {shown}>"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._data)


# Sent as the plain object it wraps (no envelope): whoever receives it needs nothing of ours.
register_type(SagaContext, None, SagaContext.as_dict)


class SealedBatch(SagaContext):
    """A batch task's return value (common.signing.batch_seal), shown without its seal: the
    seal must not reach the logs or Flower, where it could be sent again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<sealed batch of {len(self._data.get('sagas') or [])} sagas from {self._data.get('task')}>"


def stored_args_repr(ctx: Mapping[str, Any], *, sealed_failure: str | None = None) -> str:
    """What the result backend keeps as a step's arguments: ids and the chain's timing, and
    the step's seal over its failure (common.signing.failure_seal), if it has one."""
    timeline = ctx.get("_steps")
    timeline = [
        {k: meta[k] for k in TIMELINE_FIELDS if k in meta}
        for meta in (timeline[-MAX_TIMELINE:] if isinstance(timeline, list) else [])
        if isinstance(meta, dict)
    ]
    ids = {k: str(ctx.get(k))[:64] for k in ("saga_id", "order_id") if ctx.get(k) is not None}
    seal_field = {FAILURE_SEAL_FIELD: sealed_failure} if sealed_failure else {}
    try:
        return json.dumps([{**ids, "_steps": timeline, **seal_field}], separators=(",", ":"))
    except (TypeError, ValueError):
        return json.dumps([{**ids, **seal_field}])


class RedactedReprTask(Task):
    """A task whose retry keeps the message's redacted argument reprs (`argsrepr`,
    `kwargsrepr`), which Celery would otherwise render from the arguments again, and whose
    worker shows only those reprs to a control command (common.worker_control): every
    task that receives a saga context, an authority or a seal."""

    # A name, not the class: the web imports this module and runs no worker.
    Request = "common.worker_control:RedactedRequest"

    def signature_from_request(
        self, request: Any = None, args: Any = None, kwargs: Any = None, queue: Any = None, **options: Any
    ) -> Any:
        request = self.request if request is None else request
        for name in ("argsrepr", "kwargsrepr"):
            if getattr(request, name, None) is not None:
                options.setdefault(name, getattr(request, name))
        return super().signature_from_request(request, args, kwargs, queue, **options)


def require_uuid(ctx: Mapping[str, Any], field: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(ctx[field]))
    except (KeyError, ValueError, TypeError):
        raise InvalidMessage(f"message field {field!r} must be a UUID, got {ctx.get(field)!r}") from None


def require_str(ctx: Mapping[str, Any], field: str, *, max_length: int = 255) -> str:
    value = ctx.get(field)
    if not isinstance(value, str) or not value or len(value) > max_length:
        # Not the value: it may be a customer's email or card token (issue 12).
        kind = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise InvalidMessage(f"message field {field!r} must be a non-empty string of at most {max_length}, got {kind}")
    return value


def saga_step_task(
    name: str, *, max_retries: int = 5, compensation: bool = False, phase: str = "", **options: Any
) -> Callable[[Callable[..., dict[str, Any]]], Any]:
    """Declare a participant task: `fn(ctx, **kwargs) -> output dict`.

    `phase` ("forward" or "compensation"), if given, is the only phase whose authority the
    task accepts: an undo acts on the coordinator's decision to compensate, whatever a
    saga definition says.

    The wrapped function must be idempotent by its saga key (see common.idempotency).
    A compensation (or a step past the pivot) retries transient errors for
    SAGA_COMPENSATION_MAX_RETRIES: it must eventually succeed, or an operator must look.
    """
    if compensation:
        max_retries = settings.SAGA_COMPENSATION_MAX_RETRIES

    def decorator(fn: Callable[..., dict[str, Any]]) -> Any:
        @shared_task(
            name=name,
            base=RedactedReprTask,
            bind=True,
            autoretry_for=RETRYABLE,
            throws=(BusinessFailure,),
            retry_backoff=1,
            retry_backoff_max=settings.TASK_RETRY_BACKOFF_MAX,
            retry_jitter=True,
            max_retries=max_retries,
            **options,
        )
        def task(self: Any, ctx: Any, **kwargs: Any) -> SagaContext:
            started_at = timezone.now()
            setattr(self.request, STARTED_AT_ATTR, started_at.isoformat())
            if not isinstance(ctx, dict):
                raise InvalidMessage(f"{name} expects a saga context object, got {type(ctx).__name__}")
            authority = None
            try:
                # Only what the coordinator decided, for this task, over this context (issue 12).
                authority = authority_verify(kwargs.pop(AUTHORITY_KWARG, None), task=name, ctx=ctx)
                setattr(self.request, VERIFIED_ORDER_ATTR, str(ctx.get("order_id") or "")[:64])
                record = kwargs.pop(RECORD_KWARG, False) is True
                if phase and authority.phase != phase:
                    raise InvalidMessage(
                        f"{name} acts only in a saga's {phase} phase, not on a {authority.phase} message"
                    )
                output = fn({k: v for k, v in ctx.items() if k != SEAL_FIELD}, **kwargs)
            except BaseException as error:
                # A failure or retry stores this, not the context (result backend, Flower);
                # worked out only then, off the path every step takes. With it, this step's
                # seal over the failure's type, for the coordinator (common.signing).
                sealed = None
                # Only a failure that ends the step can be final (a retryable one is retried,
                # and its retried message keeps this argsrepr): no seal travels with a retry.
                if authority is not None and not isinstance(error, RETRYABLE):
                    sealed = failure_seal(
                        saga_id=authority.saga_id,
                        step=authority.step,
                        task_id=str(self.request.id),
                        error_type=type(error).__name__,
                    )
                self.request.argsrepr = stored_args_repr(ctx, sealed_failure=sealed)
                raise
            ctx = {k: v for k, v in ctx.items() if k != SEAL_FIELD}
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
            if record:
                # A chain's last step: its result is the chain's record, which the result
                # backend keeps until the coordinator drains it (saga.engine). Ids, this
                # step's output and the timeline only: no customer data at rest there.
                ids = {k: ctx[k] for k in ("saga_id", "order_id") if k in ctx}
                return SagaContext(seal({**ids, **output, "_steps": [*earlier, meta]}, authority))
            return SagaContext(seal({**ctx, **output, "_steps": [*earlier, meta]}, authority))

        task.__doc__ = fn.__doc__
        return task

    return decorator
