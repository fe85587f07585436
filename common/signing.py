"""A saga message authorises one step, in one phase and generation, over what it carries.

The coordinator (saga.engine.build_chain, the one place chains are published from) mints
an *authority* for each step of a chain it publishes, and sends it as that step's
`authority` keyword argument. The authority is signed (HMAC of SECRET_KEY through
Django's signing, its own salt, timestamped; SECRET_KEY_FALLBACKS still verify during a
rotation) over:

- the saga id, the step's name, its **task name**, the phase (forward or compensation)
  and the generation the coordinator publishes it in;
- the digest of the whole context the coordinator wrote for the chain (every field, so a
  field added to the context later, e.g. the quoted `total`, is covered without a change
  here; the outcome of a compensation is one of them);
- the step before it in the chain (`after`), or none for the chain's first step.

A step's own output travels down the chain in the context (the reserved `amount`, the
confirmed `outcome`), which the coordinator could not sign in advance. So each step, when
it has acted, *seals* the context it returns (`_seal`): a signature over the whole
context, naming the step that produced it and the coordinator's authority it acted on.
The next step accepts only a context sealed by the step its own authority says comes
before it, for the same saga, phase, generation and coordinator context.

So a message acts only where the coordinator decided it should: a forged message has no
valid authority; another step's authority names another task; a forward step's authority
never names a compensation task (a compensation's authority is minted only when the
coordinator decides to compensate, with a new generation); an altered field (amount,
outcome, items, card) breaks the digest or the seal. Each of these is `InvalidMessage`,
raised before the participant acts. Participants cannot read the saga store (least
privilege), so they do not refuse an older generation as such: a newer decision that
supersedes it (a compensation) leaves a tombstone under the step's key, which makes a
late forward message refuse to act (common.idempotency), and an older copy of the same
step is a duplicate, idempotent by that key.

Authorities expire after SAGA_MESSAGE_MAX_AGE: a message refused as too old is ignored by
the coordinator, whose sweeper re-publishes the step with a fresh authority.

**Compact tokens.** A token carries only what its verifier cannot work out from the message
itself. What it can (the saga id, the digest of the context it receives and, from that
context's seal, the step it follows; a failure's task id) is bound into the signature's
salt (`_bound`): a token minted for another saga, context or place in the chain fails its
signature, as an altered one does. Every hop of a chain carries the authorities of the
steps still ahead, and every context a seal: with the whole claim in each token, a
forward chain's first message was 5,252 bytes, now 3,688 (docs/DECISIONS.md).

Whoever holds SECRET_KEY can sign; every process of this system does. What this stops is
a foothold without it: a Flower login (its API sends any task by name), a captured or
logged message, the logs. Full protection against someone who can both read and write the
broker is Celery's message signing (celery.security).
"""

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import signing

from .exceptions import InvalidMessage

AUTHORITY_KWARG = "authority"
SEAL_FIELD = "_seal"
_AUTHORITY_SALT = "saga.step-authority"
_SEAL_SALT = "saga.step-seal"
# Each message is a handful of short fields; anything much bigger is not ours.
_MAX_TOKEN = 2048


@dataclass(frozen=True)
class Authority:
    """What one step's message authorises (the verified content of its `authority`)."""

    saga_id: str
    step: str
    task: str
    phase: str
    generation: int
    context: str  # digest of the coordinator's context for the chain
    after: str  # the step whose sealed output this step receives; "" for a chain's first


def context_digest(ctx: Mapping[str, Any]) -> str:
    """sha256 of the context's canonical JSON, without its seal, as unpadded base64url. A
    value kombu's JSON decodes into an object (a Decimal, a UUID, a datetime) counts as
    its string."""
    body = {k: v for k, v in ctx.items() if k != SEAL_FIELD}
    try:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    except (TypeError, ValueError):
        raise InvalidMessage("the saga context is not plain JSON") from None
    # base64, not hex: a seal carries it at every hop.
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _bound(salt: str, *known: Any) -> str:
    """`salt` binding what the verifier knows without reading it from the token: a token
    signed for other values fails its signature. JSON keeps the values apart."""
    return f"{salt}:{json.dumps([str(value) for value in known], separators=(',', ':'))}"


def authority_mint(
    *,
    saga_id: Any,
    step: str,
    task: str,
    phase: str,
    generation: int,
    context: Mapping[str, Any],
    after: str = "",
    digest: str | None = None,
) -> str:
    """The coordinator's authority for one step of a chain starting from `context`
    (`digest`: its `context_digest`, if the caller has it already).

    Bound, not carried: the saga id, the context's digest and the step whose output this
    one takes (`after`). The first step digests the context it receives; every later one
    takes the digest and the step from the seal of the output it receives
    (`authority_verify`). So an authority verifies only over an input of the kind it was
    minted for: a later step's never over the coordinator's raw context, the first step's
    never over a step's output."""
    digest = digest if digest is not None else context_digest(context)
    return signing.dumps([step, task, phase, generation], salt=_bound(_AUTHORITY_SALT, saga_id, digest, after))


def _loads(token: Any, salt: str, what: str, refused: Callable[[], str] | None = None) -> Any:
    """The signed value of `token`, or InvalidMessage saying why not (`refused`: what a
    bad signature may mean, where the salt binds what the message carries; worked out
    only then, off the path every step takes)."""
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN:
        raise InvalidMessage(f"no {what}: not published by the saga coordinator")
    try:
        return signing.loads(token, salt=salt, max_age=settings.SAGA_MESSAGE_MAX_AGE)
    except signing.SignatureExpired:
        raise InvalidMessage(f"the {what} has expired; the coordinator re-publishes what is still due") from None
    except (signing.BadSignature, ValueError, TypeError):
        raise InvalidMessage(f"bad {what}: {refused() if refused else 'forged or altered'}") from None


def authority_verify(token: Any, *, task: str, ctx: Mapping[str, Any]) -> Authority:
    """Raise InvalidMessage unless `token` authorises `task` to act on `ctx`.

    `ctx` must be the coordinator's context itself (the chain's first step) or sealed by
    the step the authority names as the one before, in the same phase and generation. The
    seal, if `ctx` has one, is checked first: it names the coordinator context's digest
    and the step the authority must have been minted to follow."""
    saga_id = str(ctx.get("saga_id"))
    sealed_by = seal_verify(ctx) if SEAL_FIELD in ctx else None
    digest, after = (sealed_by.context, sealed_by.step) if sealed_by else (context_digest(ctx), "")

    def refused() -> str:
        if sealed_by:
            return (
                f"forged or altered, or not for saga {saga_id[:64]!r} and this input: the output of {after} "
                f"({sealed_by.phase}, generation {sealed_by.generation}) is not the one it was signed for"
            )
        return (
            f"forged or altered, or not for saga {saga_id[:64]!r} and this context: not the one the coordinator "
            "signed (or a step's output without its seal)"
        )

    claim = _loads(token, _bound(_AUTHORITY_SALT, saga_id, digest, after), "step authority", refused)
    try:
        step, signed_task, phase, generation = claim
        authority = Authority(
            saga_id=saga_id,
            step=str(step),
            task=str(signed_task),
            phase=str(phase),
            generation=int(generation),
            context=digest,
            after=after,
        )
    except (TypeError, ValueError):
        raise InvalidMessage("bad step authority: forged or altered") from None
    if authority.task != task:
        raise InvalidMessage(
            f"the message authorises {authority.task} ({authority.phase} step {authority.step}), not {task}"
        )
    if sealed_by and (sealed_by.phase, sealed_by.generation) != (authority.phase, authority.generation):
        raise InvalidMessage(
            f"saga {saga_id}: {authority.step} takes the output of {after} "
            f"({authority.phase}, generation {authority.generation}), not this one"
        )
    return authority


def seal(ctx: Mapping[str, Any], authority: Authority) -> dict[str, Any]:
    """`ctx` (the context a step returns) sealed as the output of `authority`'s step.

    The saga id and the digest of the output are bound, not carried (`seal_verify` works
    them out from the output itself); the coordinator context's digest is carried, for the
    next step's authority."""
    body = {k: v for k, v in ctx.items() if k != SEAL_FIELD}
    if str(body.get("saga_id")) != authority.saga_id:
        raise InvalidMessage(f"{authority.step}: a step's output may not change its saga id")
    claim = [authority.step, authority.phase, authority.generation, authority.context]
    salt = _bound(_SEAL_SALT, authority.saga_id, context_digest(body))
    return {**body, SEAL_FIELD: signing.dumps(claim, salt=salt)}


def seal_verify(ctx: Mapping[str, Any]) -> Authority:
    """The authority whose step sealed `ctx`, with `task` and `after` empty; InvalidMessage
    if `ctx` is not exactly what that step returned."""
    saga_id = str(ctx.get("saga_id"))
    claim = _loads(
        ctx.get(SEAL_FIELD),
        _bound(_SEAL_SALT, saga_id, context_digest(ctx)),
        "step output seal",
        lambda: f"forged, or the step output of saga {saga_id[:64]!r} was altered after its step",
    )
    try:
        step, phase, generation, context = claim
        return Authority(
            saga_id=saga_id,
            step=str(step),
            task="",
            phase=str(phase),
            generation=int(generation),
            context=str(context),
            after="",
        )
    except (TypeError, ValueError):
        raise InvalidMessage("bad step output seal: forged or altered") from None


# --- Failure reports: a step's errback (saga.step_failed) -------------------------------
#
# A step that fails for good has its `link_error` queue `saga.step_failed(task_id,
# saga_id=..., step=...)`, and the coordinator reads the failure the result backend holds
# for that task id. The report names a saga, a step and a task id, and acting on it
# compensates a saga: so the coordinator mints, with each step's errback, an authority for
# exactly that (saga, step, task id). A report sent by anyone else (Flower's send-task, a
# foothold on the broker), or one naming another saga's stored failure, acts on nothing.
_REPORT_SALT = "saga.failure-report"


def failure_report_mint(*, saga_id: Any, step: str, task_id: str) -> str:
    """The coordinator's authority for the failure report of `step`'s task `task_id`:
    everything it covers is bound, so it carries only its time and signature."""
    return signing.dumps(1, salt=_bound(_REPORT_SALT, saga_id, step, task_id))


def failure_report_verify(token: Any, *, saga_id: Any, step: str, task_id: str) -> None:
    """Raise InvalidMessage unless `token` authorises reporting the failure of `task_id` as
    `step` of saga `saga_id`."""
    _loads(
        token,
        _bound(_REPORT_SALT, saga_id, step, task_id),
        "failure report authority",
        lambda: f"forged, or not minted for task {str(task_id)[:80]!r} of saga {str(saga_id)[:64]} ({str(step)[:64]})",
    )


# --- A failure as its step saw it -------------------------------------------------------
#
# The failure the coordinator reads from the result backend decides how much it undoes: a
# failure its step records as final (a declined card: nothing was charged, and no copy
# will charge) skips that step's compensation. Every worker's database role writes that
# table, so the participant seals the failure's type with its saga, step and task id (in
# the stored arguments: common.steps.stored_args_repr); a failure without a valid seal (a
# hard time limit's, from the worker's main process, or one rewritten in the table) is
# still a failure, but never one that skips a compensation.
_FAILURE_SALT = "saga.step-failure"
FAILURE_SEAL_FIELD = "_failure_seal"


def failure_seal(*, saga_id: Any, step: str, task_id: str, error_type: str) -> str:
    """A participant's seal over the type of the error its step `task_id` failed with."""
    return signing.dumps(1, salt=_bound(_FAILURE_SALT, saga_id, step, task_id, error_type))


def failure_seal_valid(token: Any, *, saga_id: Any, step: str, task_id: str, error_type: str) -> bool:
    """Whether `token` is the participant's seal over exactly this failure."""
    try:
        _loads(token, _bound(_FAILURE_SALT, saga_id, step, task_id, error_type), "failure seal")
    except InvalidMessage:
        return False
    return True


# --- Batches: one message for many sagas (saga.settlement) -------------------------------
#
# A settlement (a confirmed order's held stock becoming a sale) is sent for a batch of
# sagas at once, outside any chain. Its authority names the task and the digest of the
# batch's saga ids, so a message with another task or another batch (a saga added, one
# whose order was never confirmed) acts on nothing. The participant seals what it did the
# same way, for the coordinator's task that records it.
_BATCH_AUTHORITY_SALT = "saga.batch-authority"
_BATCH_SEAL_SALT = "saga.batch-seal"


def _ids_digest(ids: Iterable[Any]) -> str:
    return hashlib.sha256(",".join(sorted(str(i) for i in ids)).encode()).hexdigest()


def batch_authority_mint(*, task: str, saga_ids: Iterable[Any]) -> str:
    """The coordinator's authority for `task` to act on exactly the sagas `saga_ids`."""
    return signing.dumps({"task": task, "ids": _ids_digest(saga_ids)}, salt=_BATCH_AUTHORITY_SALT)


def batch_authority_verify(token: Any, *, task: str, saga_ids: Iterable[Any]) -> None:
    """Raise InvalidMessage unless `token` authorises `task` over exactly `saga_ids`."""
    claim = _loads(token, _BATCH_AUTHORITY_SALT, "batch authority")
    if claim.get("task") != task:
        raise InvalidMessage(f"the message authorises {str(claim.get('task'))[:64]}, not {task}")
    if claim.get("ids") != _ids_digest(saga_ids):
        raise InvalidMessage(f"{task}: the batch is not the one the coordinator signed")


def batch_seal(*, task: str, saga_ids: Sequence[str]) -> dict[str, Any]:
    """What a batch task returns: the sagas it settled, sealed as `task`'s output."""
    token = signing.dumps({"task": task, "ids": _ids_digest(saga_ids)}, salt=_BATCH_SEAL_SALT)
    return {"sagas": list(saga_ids), "task": task, SEAL_FIELD: token}


def batch_seal_verify(output: Any) -> tuple[str, list[str]]:
    """(task, saga ids) of a sealed batch output; InvalidMessage if it is not what that task returned."""
    if not isinstance(output, Mapping) or not isinstance(output.get("sagas"), list):
        raise InvalidMessage("a batch output must be an object with a list of sagas")
    claim = _loads(output.get(SEAL_FIELD), _BATCH_SEAL_SALT, "batch output seal")
    saga_ids = [str(i) for i in output["sagas"]]
    if claim.get("task") != output.get("task") or claim.get("ids") != _ids_digest(saga_ids):
        raise InvalidMessage("the batch output was altered after its task")
    return str(claim["task"]), saga_ids
