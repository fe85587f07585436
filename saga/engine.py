"""Turn a saga definition into Celery canvas: chains of signatures called by name.

Pure functions of (definition, saga id, generation, context): nothing here touches a
database or a broker, so the chain layout is unit-tested without workers.

Each step signature carries
- a deterministic task id `<saga>-<step>-g<generation>` (find it in Flower by saga id),
- `link_error` -> `saga.step_failed`. That task is registered only in the saga worker,
  so the failing worker queues it with the failed task id and the coordinator reads the
  exception (and the failed step's arguments) from the result backend: the same
  behaviour in every topology.

Only the chain's last step has a `link` -> `saga.step_succeeded`. The steps before it
report nothing on their own: each appends its timing to the context it passes on
(`_steps`, common.steps), so the last step's report carries the whole chain's timeline.
One report per chain instead of one per step is what keeps the saga's bookkeeping near
the cost of a bare chain (BENCHMARKS.md). The pivot records the steps before it in its
own transaction (saga.services.saga_pivot_commit), so the store never lags a confirmed
order.
"""

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Signature, chain

from common.signing import context_sign
from orders_project.celery import app

from .definition import Step

STEP_SUCCEEDED_TASK = "saga.step_succeeded"
STEP_FAILED_TASK = "saga.step_failed"


def task_id_for(saga_id: uuid.UUID | str, step_name: str, generation: int) -> str:
    return f"{saga_id}-{step_name}-g{generation}"


def step_name_of(task_id: str, saga_id: uuid.UUID | str) -> str | None:
    """The step a task id of `saga_id` names (inverse of task_id_for); None if it is not one."""
    prefix = f"{saga_id}-"
    if not isinstance(task_id, str) or not task_id.startswith(prefix) or "-g" not in task_id:
        return None
    return task_id[len(prefix) :].rpartition("-g")[0] or None


def step_signature(step: Step, *, saga_id: uuid.UUID | str, generation: int, report: bool = True) -> Signature:
    """One step's signature; with `report`, its success is reported to the coordinator."""
    callback_kwargs = {"saga_id": str(saga_id), "step": step.name}
    sig = app.signature(step.task, kwargs=dict(step.kwargs))
    # Flower and the worker logs show these instead of the saga context: no customer's
    # email or card token there, and no repr of the context on every publish (a few % of
    # a participant's CPU, BENCHMARKS.md).
    sig.set(task_id=task_id_for(saga_id, step.name, generation), argsrepr=f"(<saga {saga_id} context>,)")
    if report:
        sig.link(app.signature(STEP_SUCCEEDED_TASK, kwargs=callback_kwargs))
    sig.link_error(app.signature(STEP_FAILED_TASK, kwargs=callback_kwargs))
    return sig


def build_chain(
    steps: Iterable[Step], *, saga_id: uuid.UUID | str, generation: int, context: Mapping[str, Any]
) -> Signature:
    """A chain running `steps` in order; the first receives `context`, signed (participants
    verify it: common.signing), each next one receives what the previous returned."""
    steps = list(steps)
    signatures = [
        step_signature(step, saga_id=saga_id, generation=generation, report=i == len(steps) - 1)
        for i, step in enumerate(steps)
    ]
    if not signatures:
        raise ValueError("a saga chain needs at least one step")
    first = signatures[0]
    first.args = (context_sign(context),)
    if len(signatures) == 1:
        return first
    return chain(*signatures, app=app)
