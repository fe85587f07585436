"""Turn a saga definition into Celery canvas: chains of signatures called by name.

Pure functions of (definition, saga id, generation, context): nothing here touches a
database or a broker, so the chain layout is unit-tested without workers.

Each step signature carries
- a deterministic task id `<saga>-<step>-g<generation>` (find it in Flower by saga id),
- `link` -> `saga.step_succeeded` (progress reaches the saga store as a message to the
  `saga` queue; participants never write the orders database),
- `link_error` -> `saga.step_failed`. That task is registered only in the saga worker,
  so the failing worker queues it with the failed task id and the coordinator reads the
  exception from the result backend: the same behaviour in every topology.
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


def step_signature(step: Step, *, saga_id: uuid.UUID | str, generation: int) -> Signature:
    callback_kwargs = {"saga_id": str(saga_id), "step": step.name}
    sig = app.signature(step.task, kwargs=dict(step.kwargs))
    sig.set(task_id=task_id_for(saga_id, step.name, generation))
    sig.link(app.signature(STEP_SUCCEEDED_TASK, kwargs=callback_kwargs))
    sig.link_error(app.signature(STEP_FAILED_TASK, kwargs=callback_kwargs))
    return sig


def build_chain(
    steps: Iterable[Step], *, saga_id: uuid.UUID | str, generation: int, context: Mapping[str, Any]
) -> Signature:
    """A chain running `steps` in order; the first receives `context`, signed (participants
    verify it: common.signing), each next one receives what the previous returned."""
    signatures = [step_signature(step, saga_id=saga_id, generation=generation) for step in steps]
    if not signatures:
        raise ValueError("a saga chain needs at least one step")
    first = signatures[0]
    first.args = (context_sign(context),)
    if len(signatures) == 1:
        return first
    return chain(*signatures, app=app)
