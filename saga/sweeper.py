"""The sweeper (`saga.sweep`, every SAGA_SWEEP_INTERVAL): drains the chains' records, then
finds running steps past their deadline and recovers them: re-published, compensated, or
handed to an operator. Where a stalled chain's messages are is asked of the broker and
the workers (saga.recovery); a chain that is slow, not lost, gets more time.
"""

import dataclasses
import logging
import math
from collections import Counter
from datetime import datetime, timedelta

from celery import states
from django.conf import settings
from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from . import broker_latch, recovery, store
from .definition import get_definition
from .engine import task_id_for
from .failure import stop_running
from .models import SagaInstance, SagaStatus, SagaStep, StepPhase, StepStatus
from .progress import RESULTS_DB, saga_reports_drain
from .publish import OUTCOME_FAILED, phase_plan, saga_begin_compensation, saga_republish_from
from .settlement import saga_settlements_send
from .store import DB

logger = logging.getLogger(__name__)


def _recover_stalled(saga: SagaInstance, step: SagaStep, steps: dict[str, SagaStep], now: datetime) -> str:
    definition = get_definition(saga.definition, saga.definition_version)
    if (
        saga.pivot_committed_at is not None
        and step.phase == StepPhase.FORWARD
        and definition.forward_index(step.name) <= definition.pivot_index
    ):
        # The pivot committed, so this step did too; only its report is late or lost, and
        # without it there is no attempt or time to show.
        step.mark_unknown()
        step.save(using=DB)
        return "succeeded"
    if step.republished < settings.SAGA_REPUBLISH_BUDGET:
        saga_republish_from(saga, step, now=now)
        return "republished"
    reason = f"{step.name} did not report back after {step.republished} re-publishes"
    step.mark_failed(f"StepTimedOut: {reason}", at=now)
    pivot_or_later = step.phase == StepPhase.FORWARD and definition.forward_index(step.name) >= definition.pivot_index
    if step.phase == StepPhase.FORWARD and saga.status == SagaStatus.RUNNING and not pivot_or_later:
        saga_begin_compensation(
            saga,
            outcome=OUTCOME_FAILED,
            failure_step=step.name,
            failure_type="StepTimedOut",
            reason=reason,
            steps=steps.values(),
            also_save=[step],
        )
        return "compensating"
    # A pivot that never reported may have committed: an operator decides, not the sweeper.
    saga.mark_needs_attention(failure_step=step.name, failure_type="StepTimedOut", reason=reason)
    changed = [step]
    stop_running(steps.values(), changed)
    store.save(saga, changed)
    return "needs_attention"


def _segment_chain(saga: SagaInstance, step: SagaStep) -> list[tuple[str, str, float]]:
    """(task id, queue, deadline) of each step of the segment the store waits on, from `step`."""
    definition = get_definition(saga.definition, saga.definition_version)
    plan = phase_plan(definition, step.phase)
    stop = len(plan) - 1
    if step.phase == StepPhase.FORWARD and step.position <= definition.pivot_index:
        stop = definition.pivot_index
    return [
        (task_id_for(saga.id, spec.name, saga.generation), _queue_of(spec.task), float(spec.deadline_seconds))
        for spec in plan[step.position : stop + 1]
    ]


def _queue_of(task_name: str) -> str:
    return task_name.split(".")[0]


def saga_sweep(*, now: datetime | None = None, batch: int | None = None) -> dict[str, int]:
    """Find running steps past their deadline and recover them; return what was done.

    Covers a lost or dropped message, a worker that died with its message, a chain whose
    publish failed after the order committed (its first step never started; the failed
    publish made it due at once: saga.publish._due_now), and a stalled compensation. The
    scan reads only running steps past their deadline (a partial index), oldest first, in
    bounded batches; each saga is handled in its own short transaction and skipped if
    another sweeper holds it (SKIP LOCKED).

    (The messages of workers that died holding them are returned by every worker's
    watchdog, saga.recovery.orphans_restore, not here.) Per stalled step, the broker and the workers are
    asked where its chain is (saga.recovery.chain_whereabouts: one broadcast and one look
    at each queue's oldest message for the whole batch): held by a live worker, or possibly
    still waiting behind older messages, it gets a new deadline without spending its
    budget (slow is not broken); otherwise its message is lost and it is recovered.
    """
    now = now or timezone.now()
    batch = batch or settings.SAGA_SWEEP_BATCH
    done: Counter[str] = Counter()
    # Before looking for stalled steps: a chain whose record waits here is not stalled.
    if recorded := saga_reports_drain():
        done["recorded"] += recorded
    if broker_latch.LATCH.down():
        # This process found the broker away and has not heard it since: every message
        # waits where it is (nothing is lost by waiting), and a re-publish would only be
        # skipped, spending a step's budget for nothing. The next sweep looks again.
        done["broker_away"] += 1
        return dict(done)
    done.update(_settlements_send(now))
    try:
        done.update(_quiet_steps_look(now, batch=batch))
    except Exception:  # a look that fails leaves every deadline as it was: the sweep goes on
        logger.warning("looking for quiet steps' messages failed; their deadlines stand", exc_info=True)
    stalled = list(
        SagaStep.objects.using(DB)
        .filter(status=StepStatus.RUNNING, deadline_at__lt=now)
        .order_by("deadline_at")
        .values_list("saga_id", "name")[:batch]
    )
    if not stalled:
        return dict(done)
    wanted = set(stalled)
    # Where the chains are, asked of the broker and the workers, but for a chain never
    # sent, which can be nowhere (saga.publish._due_now).
    chains = [
        _segment_chain(saga, step)
        for saga in SagaInstance.objects.using(DB).filter(id__in={s for s, _ in stalled}).prefetch_related("steps")
        for step in saga.steps.all()
        if (saga.id, step.name) in wanted and not step.never_sent
    ]
    view = (
        recovery.broker_view(
            queues={queue for chain in chains for _, queue, _ in chain} | {"saga"},
            task_ids=sorted({task_id for chain in chains for task_id, _, _ in chain}),
        )
        if chains
        else recovery.BrokerView(workers_answered=1)
    )
    asked = {task_id for chain in chains for task_id, _, _ in chain}
    stored = _outcomes_stored(sorted(asked), now=now) if asked else Stored()
    view = dataclasses.replace(view, held=view.held | stored.retrying)
    if chains and not view.workers_answered:
        # Not one worker answered (the saga worker running this sweep is one): the broadcast
        # failed, not the fleet (a broker restart leaves a connection deaf for seconds).
        logger.warning("no worker answered the sweeper's look at %d stalled steps", len(stalled))
    for saga_id, step_name in stalled:
        if broker_latch.LATCH.down():
            # The last re-publish found the broker away: the rest would only be skipped.
            done["broker_away"] += 1
            break
        with transaction.atomic(using=DB):
            saga, steps = store.lock_sagas_with_steps([saga_id], skip_locked=True).get(saga_id, (None, {}))
            step = steps.get(step_name)
            if (
                saga is None
                or saga.status not in (SagaStatus.RUNNING, SagaStatus.COMPENSATING)
                or step is None
                or step.status != StepStatus.RUNNING
                or step.deadline_at is None
                or step.deadline_at >= now
            ):
                done["skipped"] += 1
                continue
            if step.never_sent:
                outcome = _recover_stalled(saga, step, steps, now)
                logger.warning("saga %s: step %s was never sent (the broker was away): %s", saga.id, step.name, outcome)
                done[outcome] += 1
                continue
            chain = _segment_chain(saga, step)
            queued_at = step.queued_at or (step.deadline_at - timedelta(seconds=sum(d for _, _, d in chain)))
            where = recovery.chain_whereabouts(
                queued_at=queued_at.timestamp(),
                chain=chain,
                view=view,
                now=now.timestamp(),
                report_sent_by=_report_sent_by(chain, stored.failed, asked),
            )
            if where.verdict == "lost" and not view.workers_answered:
                # Unheard is not lost: a live worker may hold it. Treated as possibly waiting,
                # so it is re-published only past its patience (below), as a step whose
                # queue cannot be read is: recovery still comes if the control channel
                # stays broken (remote control turned off), only later.
                where = recovery.Whereabouts("waiting", wait=where.wait)
                done["unanswered"] += 1
            patience = sum(d for _, _, d in chain) * settings.SAGA_BACKLOG_PATIENCE
            if where.verdict == "held" or (where.verdict == "waiting" and (now - queued_at).total_seconds() < patience):
                # Being worked on, or possibly queued behind older messages: the system is
                # slow, not broken. Re-publishing would only add to the pile, so look again
                # later without spending the step's budget. (Waiting is bounded: in a FIFO
                # queue the head moves past our message, or, where the head is unknown (AMQP,
                # before a live worker has taken from the queue), SAGA_BACKLOG_PATIENCE
                # segments after it was queued.)
                again = chain[0][2] if where.verdict == "held" else where.wait
                again = min(max(again, settings.SAGA_SWEEP_INTERVAL), sum(d for _, _, d in chain))
                step.deadline_at = now + timedelta(seconds=again)
                step.save(using=DB, update_fields=["deadline_at"])
                done[where.verdict] += 1
                continue
            outcome = _recover_stalled(saga, step, steps, now)
            logger.warning("saga %s: step %s stalled past its deadline: %s", saga.id, step.name, outcome)
            done[outcome] += 1
    return dict(done)


def _quiet_steps_look(now: datetime, *, batch: int) -> dict[str, int]:
    """Look, before their deadline, for the chains of running steps that have been quiet
    for SAGA_QUIET_SECONDS, and bring the deadline of each whose message is nowhere to now.

    A step's deadline is its whole segment's (three steps' SAGA_STEP_TIMEOUT for a new
    order's first one), which is what a lost message cost before this look. The look
    decides nothing itself: the next sweep looks again, with the whole look of the stalled
    path, and recovers the step only if it is still nowhere. Two looks at least a sweep
    interval apart, as the watchdog takes before it returns a message (saga.recovery), so a
    message caught between two places in one look (published but not yet queued, taken
    but not yet registered by its worker) is not called lost; a false call would cost one
    copy of a step, which every step survives, and one unit of its re-publish budget.

    Cheap where nothing is quiet (one scan of the running steps' partial index); where
    something is, one read of the queues' oldest messages, and a `query_task` broadcast
    only for the chains that no queue can be holding: behind a backlog (a busy queue whose
    oldest message is older than the chain), nothing is asked of the workers, and the
    chain waits for its deadline, as before. On RabbitMQ a queue that holds messages counts
    as a backlog (its head cannot be read without asking the workers how far they got).
    The coordinator's own queue, seldom empty, counts only behind a stored failure of the
    chain, for messages sent before that failure's report; a task that stored a retry
    within the longest countdown counts as held (`_outcomes_stored`).
    """
    quiet = settings.SAGA_QUIET_SECONDS
    if quiet <= 0:
        return {}
    steps = list(
        SagaStep.objects.using(DB)
        .filter(status=StepStatus.RUNNING, deadline_at__gt=now, queued_at__lt=now - timedelta(seconds=quiet))
        .select_related("saga")
        .only(*QUIET_STEP_FIELDS)
        .order_by("queued_at")[:batch]
    )
    if not steps:
        return {}
    chains = {step.id: _segment_chain(step.saga, step) for step in steps}
    # Never None: the scan reads queued steps only (a step never sent has none).
    queued = {step.id: step.queued_at for step in steps if step.queued_at is not None}
    heads = recovery.queue_heads({queue for chain in chains.values() for _, queue, _ in chain} | {"saga"})
    asked = {task_id for chain in chains.values() for task_id, _, _ in chain}
    stored = _outcomes_stored(sorted(asked), now=now)

    def nowhere(step: SagaStep, held: frozenset[str] = frozenset()) -> bool:
        view = recovery.BrokerView(held=held | stored.retrying, heads=heads, workers_answered=1)
        where = recovery.chain_whereabouts(
            queued_at=queued[step.id].timestamp(),
            chain=chains[step.id],
            view=view,
            now=now.timestamp(),
            report_sent_by=_report_sent_by(chains[step.id], stored.failed, asked),
        )
        return where.verdict == "lost"

    suspects = [step for step in steps if nowhere(step)]
    if not suspects:
        return {}
    # An early broadcast (it stops once the workers of the last whole look answered): a
    # worker it misses leaves a chain for the next sweep's whole look, which decides.
    task_ids = sorted({task_id for suspect in suspects for task_id, _, _ in chains[suspect.id]})
    held, answered = recovery.held_task_ids(task_ids, early=True)
    if not answered:
        return {}  # unheard is not nowhere: the deadline stands
    lost = [step for step in suspects if nowhere(step, frozenset(held))]
    for step in lost:
        logger.info(
            "saga %s: step %s has been quiet for %.0f s and its message is nowhere; the next sweep looks again",
            step.saga_id,
            step.name,
            (now - queued[step.id]).total_seconds(),
        )
    if not lost:
        return {}
    # Without the saga's lock: only a step still at the generation this look judged (its
    # queue time), as a retry or a sweep may have re-published it during the broadcast, with
    # a deadline this would cut short.
    judged = Q()
    for step in lost:
        judged |= Q(id=step.id, queued_at=queued[step.id])
    brought = (
        SagaStep.objects.using(DB)
        .filter(judged, status=StepStatus.RUNNING, deadline_at__gt=now)
        .update(deadline_at=now)
    )
    return {"quiet_due": brought} if brought else {}


@dataclasses.dataclass(frozen=True)
class Stored:
    """What the result backend says of a chain's tasks (`_outcomes_stored`)."""

    failed: dict[str, float] = dataclasses.field(default_factory=dict)  # task id -> when (epoch s)
    retrying: frozenset[str] = frozenset()


def _outcomes_stored(task_ids: list[str], *, now: datetime) -> Stored:
    """The failures and the retries the result backend holds among `task_ids`: one read by
    the unique index.

    - A failure is stored before its failure report is sent, so a chain with none has no
      report on its way (`_report_sent_by`).
    - A retry is stored as the task publishes its next attempt with a countdown (at most
      TASK_RETRY_BACKOFF_MAX). That attempt is held by its worker until it runs. Celery 5.7
      unregistered it from the workers' answer (the attempt that published it, ending a
      moment later, popped its task id: common.celery_fixes), so `query_task` missed it.
      The patch makes workers answer for it; a task that stored a retry within the longest
      countdown (and the clock slack) is still counted as held, because a worker running
      an image without the patch (a rolling upgrade) answers the old way, and this read is
      the one the failures take anyway.

    Every worker's database role writes the result backend, so a record dated later than
    now by more than the clock slack is not believed: one dated next year would otherwise
    have held its saga's step off the sweeper for a year.
    """
    from django_celery_results.models import TaskResult

    with connections[RESULTS_DB].cursor() as cursor:
        cursor.execute(
            f"SELECT task_id, status, extract(epoch FROM date_done) FROM {TaskResult._meta.db_table} "
            "WHERE task_id = ANY(%s) AND status = ANY(%s)",
            [task_ids, [states.FAILURE, states.REVOKED, states.RETRY]],
        )
        rows = cursor.fetchall()
    at = now.timestamp()
    since, until = at - settings.TASK_RETRY_BACKOFF_MAX - settings.SAGA_CLOCK_SLACK, at + settings.SAGA_CLOCK_SLACK
    return Stored(
        failed={task_id: float(done) for task_id, status, done in rows if status != states.RETRY and done <= until},
        retrying=frozenset(
            task_id for task_id, status, done in rows if status == states.RETRY and since < done <= until
        ),
    )


def _report_sent_by(chain: list[tuple[str, str, float]], failed: dict[str, float], asked: set[str]) -> float | None:
    """The latest a failure report of `chain` can have been sent (recovery.chain_whereabouts):
    None if none of its steps has a stored failure, so no report is on its way; the latest
    failure's time plus the clock slack otherwise. The coordinator's queue is the busiest
    (a sweep every interval, every failure report), and a chain counted as possibly
    behind any message there waited out its deadline in `make chaos`. Unbounded (inf) for
    a chain whose task ids were not among those `asked` about."""
    ids = [task_id for task_id, _, _ in chain]
    if not asked.issuperset(ids):
        return math.inf
    stored = [failed[task_id] for task_id in ids if task_id in failed]
    return max(stored) + settings.SAGA_CLOCK_SLACK if stored else None


# What _segment_chain and _quiet_steps_look read of a quiet step and its saga.
QUIET_STEP_FIELDS = (
    "id",
    "saga_id",
    "name",
    "phase",
    "position",
    "queued_at",
    "saga__id",
    "saga__definition",
    "saga__definition_version",
    "saga__generation",
)


def _settlements_send(now: datetime) -> dict[str, int]:
    """Sagas past their pivot get their settlement (a confirmed order's stock becomes a
    sale): saga.settlement. It must never stop the sweep."""
    try:
        return saga_settlements_send(now=now)
    except Exception:
        logger.warning("sending settlements failed; the next sweep tries again", exc_info=True)
        return {}
