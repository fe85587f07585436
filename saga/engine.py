"""Turn a saga definition into Celery canvas: chains of signatures called by name.

Pure functions of (definition, saga id, generation, context): nothing here touches a
database or a broker, so the chain layout is unit-tested without workers.

Each step signature carries
- a deterministic task id `<saga>-<step>-g<generation>` (find it in Flower by saga id),
- `link_error` -> `saga.step_failed`, with the coordinator's authority to report that
  task's failure (common.signing). That task is registered only in the saga worker,
  so the failing worker queues it with the failed task id and the coordinator reads the
  exception (and the failed step's arguments) from the result backend: the same
  behaviour in every topology.

No step reports its success with a message of its own. Each appends its timing to the
context it passes on (`_steps`, common.steps); the chain's last step alone (its `record`
keyword) returns the chain's record and stores it (`ignore_result=False` on its
signature; every other task ignores results): its output and timeline, sealed, with ids only. The
coordinator drains those records from the result backend in batches
(saga.progress.saga_reports_drain, each sweep) instead of running a Celery task per
report: a report costs the last step one insert, not a message, a task and its events
(BENCHMARKS.md). The pivot records the steps before it in its own transaction
(saga.progress.saga_pivot_commit), so the store never lags a confirmed order.

Each step's message carries the coordinator's authority for that step (common.signing):
its saga, step, task, phase and generation, the digest of the context the chain starts
from, and the step whose sealed output it takes. The first step receives the context
itself. Flower and the logs see `argsrepr`/`kwargsrepr`, never the context or an authority.
"""

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from celery import Signature, chain
from kombu.utils import json

from common.signing import (
    AUTHORITY_KWARG,
    authority_mint,
    batch_authority_mint,
    context_digest,
    failure_report_mint,
)
from common.steps import RECORD_KWARG
from orders_project.celery import app

from .definition import Step

STEP_FAILED_TASK = "saga.step_failed"
# The coordinator's task that records a settled batch (saga.settlement).
SETTLED_TASK = "saga.settled"


def task_id_for(saga_id: uuid.UUID | str, step_name: str, generation: int) -> str:
    return f"{saga_id}-{step_name}-g{generation}"


def step_name_of(task_id: Any, saga_id: uuid.UUID | str) -> str | None:
    """The step a task id of `saga_id` names (inverse of task_id_for); None if it is not one."""
    prefix = f"{saga_id}-"
    if not isinstance(task_id, str) or not task_id.startswith(prefix) or "-g" not in task_id:
        return None
    return task_id[len(prefix) :].rpartition("-g")[0] or None


def step_signature(
    step: Step,
    *,
    saga_id: uuid.UUID | str,
    generation: int,
    phase: str,
    context: Mapping[str, Any],
    after: str = "",
    report: bool = True,
    digest: str | None = None,
) -> Signature:
    """One step's signature, with its authority for a chain starting from `context` in
    which it follows the step `after` ("" for the first); with `report`, it stores its
    result (the chain's record) for the coordinator to drain. `digest`: the context's
    `context_digest`, if the caller has it already."""
    task_id = task_id_for(saga_id, step.name, generation)
    # The errback reports this very task's failure, with the coordinator's authority for it
    # (common.signing): a report nobody minted, or naming another task, acts on nothing.
    callback_kwargs = {
        "saga_id": str(saga_id),
        "step": step.name,
        AUTHORITY_KWARG: failure_report_mint(saga_id=saga_id, step=step.name, task_id=task_id),
    }
    authority = authority_mint(
        saga_id=saga_id,
        step=step.name,
        task=step.task,
        phase=phase,
        generation=generation,
        context=context,
        after=after,
        digest=digest,
    )
    kwargs = {**step.kwargs, AUTHORITY_KWARG: authority, **({RECORD_KWARG: True} if report else {})}
    sig = app.signature(step.task, kwargs=kwargs)
    # Flower, task events, the worker logs and stored failures show these instead of the
    # saga context and the authority: no customer's email or card token there, nothing
    # that could be sent again, and no repr of the context on every publish (a few % of a
    # participant's CPU, BENCHMARKS.md).
    options: dict[str, Any] = {
        "task_id": task_id,
        "argsrepr": f"(<saga {saga_id} context>,)",
        "kwargsrepr": f"{{'{AUTHORITY_KWARG}': <{phase} step {step.name} g{generation}>}}",
    }
    if report:
        options["ignore_result"] = False
    sig.set(**options)
    errback = app.signature(STEP_FAILED_TASK, kwargs=callback_kwargs)
    # Flower and the logs see the report's ids, never its authority.
    shown: dict[str, Any] = {
        "kwargsrepr": f"{{'saga_id': '{saga_id}', 'step': '{step.name}', '{AUTHORITY_KWARG}': <failure report>}}"
    }
    errback.set(**shown)
    sig.link_error(errback)
    return sig


def build_chain(
    steps: Iterable[Step], *, saga_id: uuid.UUID | str, generation: int, phase: str, context: Mapping[str, Any]
) -> Signature:
    """A chain running `steps` of `phase` in order, as `generation`: the first receives
    `context`, each next one what the previous returned (sealed: common.signing). Each
    step's authority covers `context` whole, so every field the coordinator writes (the
    order request, the quoted total, a compensation's outcome) is signed."""
    steps = list(steps)
    if not steps:
        raise ValueError("a saga chain needs at least one step")
    # Signed as the participants will receive it, through kombu's JSON (which turns some
    # types into others on the way), so both sides digest the same thing.
    context = json.loads(json.dumps({k: v for k, v in context.items() if not k.startswith("_")}))
    digest = context_digest(context)  # every step's authority covers the same context
    signatures = [
        step_signature(
            step,
            saga_id=saga_id,
            generation=generation,
            phase=phase,
            context=context,
            after=steps[i - 1].name if i else "",
            report=i == len(steps) - 1,
            digest=digest,
        )
        for i, step in enumerate(steps)
    ]
    first = signatures[0]
    first["args"] = (context,)
    if len(signatures) == 1:
        return first
    return chain(*signatures, app=app)


def settlement_chain(step: Step, *, saga_ids: Iterable[uuid.UUID | str]) -> Signature:
    """The one message that settles a batch of sagas: `step.task(saga_ids)`, authorised
    for exactly those sagas, then `saga.settled` with its sealed output (the sagas it
    settled). Results travel down the chain in the message: nothing is stored."""
    ids = sorted(str(saga_id) for saga_id in saga_ids)
    if not ids:
        raise ValueError("a settlement needs at least one saga")
    settle = app.signature(
        step.task,
        args=(ids,),
        kwargs={**step.kwargs, AUTHORITY_KWARG: batch_authority_mint(task=step.task, saga_ids=ids)},
    )
    # Flower and the logs show how many sagas, not the ids and the authority.
    shown: dict[str, Any] = {
        "argsrepr": f"(<{len(ids)} sagas>,)",
        "kwargsrepr": f"{{'{AUTHORITY_KWARG}': <settlement {step.name}>}}",
    }
    settle.set(**shown)
    settled = app.signature(SETTLED_TASK, kwargs={"step": step.name})
    shown = {"argsrepr": f"(<{len(ids)} sagas settled>,)"}
    settled.set(**shown)
    return chain(settle, settled, app=app)
