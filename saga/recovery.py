"""What the recovery sweeper asks the broker and the workers, at a cost that follows the
number of stalled steps (and of abandoned messages), never the number of queued messages.

Three questions, each answered on Redis and on RabbitMQ alike where they can be:

- Does a live worker hold one of these task ids (running it, prefetched, or waiting for
  its retry's countdown: common.celery_fixes)? One `query_task` broadcast for the whole
  batch of stalled steps.
- When was the oldest message still waiting in each queue sent? Every message carries the
  time it was published (`SENT_AT`, stamped by `stamp_sent_at` in every process). Queues are
  FIFO, so a message sent before that head is no longer waiting. Redis lets us read the
  head (`LINDEX queue -1`, O(1)). AMQP cannot peek, so there the workers say how far they
  have got instead: each worker notes when the newest message it took from its queue was
  sent (`taken_note`), and a message sent before that was delivered before it (FIFO), so
  it is no longer waiting either (`taken_heads`, one broadcast). A non-empty queue no live
  worker has taken from yet has an unknown head ("could be anything", which the sweeper
  bounds by SAGA_BACKLOG_PATIENCE).
- Which messages did a worker take and never acknowledge, and is that worker gone? (Redis
  only: RabbitMQ returns a dead consumer's messages at once.) kombu's Redis transport keeps
  each delivered message in the `unacked` hash, by delivery tag, with the time it was
  delivered in the `unacked_index` sorted set, and returns it to its queue only after the
  visibility timeout (60 s in production). `orphans_restore` returns it as soon as no live
  worker has claimed it in two looks a couple of seconds apart. A message a worker took
  off its queue and died before recording (common.kombu_fixes keeps it meanwhile in the
  queue's delivering list) is returned the same way, without asking the workers. It runs
  in a thread of every worker's main process (`watchdog_start`), not in the sweep task: a
  sweep waits in the `saga` queue behind the coordinator's backlog (and expires there),
  and none runs while the saga worker itself is the one that died.
"""

import contextlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from celery.worker.control import inspect_command
from django.conf import settings
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.kombu_fixes import delivering_key, delivering_return, unacked_restore
from orders_project.celery import SERVICES, app

logger = logging.getLogger(__name__)

# A message header: when the message was published (seconds since the epoch). Set on every
# publish, including a chain's next step (published by the worker of the step before) and a
# retry; a message kombu restores keeps its original time.
SENT_AT = "saga_sent_at"
# The watchdog's own notes in Redis: delivery tag -> when it was first seen abandoned.
SUSPECTS_KEY = "saga:watchdog:suspects"
LOCK_KEY = "saga:watchdog:lock"
# Set (with a time to live of about one interval) by the watchdog that takes a look: every
# worker runs a watchdog, and one look per interval for the whole fleet is enough.
LOOKED_KEY = "saga:watchdog:looked"

EMPTY = math.inf  # a queue with nothing waiting: any message sent before now was taken
UNKNOWN = -math.inf  # a non-empty queue whose head we cannot read (AMQP): assume the worst


def stamp_sent_at(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """`before_task_publish` receiver (connected in every process: saga.apps)."""
    if isinstance(headers, dict):
        headers[SENT_AT] = time.time()


def is_redis() -> bool:
    return settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://", "valkey://"))


@dataclass(frozen=True)
class BrokerView:
    """What the sweeper learned in one look: task ids live workers hold, and when the
    oldest waiting message of each queue was sent (EMPTY, UNKNOWN, or a time)."""

    held: frozenset[str] = frozenset()
    heads: dict[str, float] = field(default_factory=dict)
    workers_answered: int = 0


# How many workers answered this process's last whole look (or its first look): an early look
# stops waiting once that many have answered (a broadcast otherwise waits its whole timeout).
_workers_seen = 0


def _query(task_ids: Sequence[str], *, early: bool = False, connection: Any = None) -> dict[str, Any]:
    global _workers_seen
    if not task_ids:
        return {}
    limit = _workers_seen if early and _workers_seen else None
    try:
        inspect = app.control.inspect(timeout=settings.SAGA_INSPECT_TIMEOUT, limit=limit, connection=connection)
        replies = inspect.query_task(*task_ids) or {}
    except Exception:
        logger.warning("could not ask the workers which tasks they hold", exc_info=True)
        return {}
    if not early or len(replies) > _workers_seen:
        # A whole look counts the fleet (down too: a dead worker no longer answers); an early
        # one stops at the count it was given, so it can only raise a count of 0. Either way
        # no message is returned, and no step re-published, on an early look.
        _workers_seen = len(replies)
    return replies


def held_task_ids(task_ids: Sequence[str], *, early: bool = False, connection: Any = None) -> tuple[set[str], int]:
    """The ids among `task_ids` that a live worker holds (active, reserved, or a retry
    waiting out its countdown: common.celery_fixes), and how many workers answered. One
    broadcast; with `early`, it returns once as many workers have answered as the most a
    whole look of this process heard, instead of always waiting the whole timeout: a
    worker that joined since can then be missed (kombu stops at that many replies), so an
    early look must not be the one a message is restored or a step re-published on.
    `connection`: the broker connection to broadcast on (default: the process's pool)."""
    replies = _query(task_ids, early=early, connection=connection)
    held = {task_id for reply in replies.values() if isinstance(reply, dict) for task_id in reply}
    return held, len(replies)


class Held(NamedTuple):
    """What a live worker says of a task it holds: `state` (active, reserved, scheduled),
    the worker's name, and how many times the task was retried (0 if it did not say)."""

    state: str
    worker: str
    retries: int = 0


def query_tasks(task_ids: Sequence[str]) -> dict[str, Held]:
    """Task id -> what a live worker says of it, for the ids a live worker holds. One
    broadcast. A reply is whatever its sender wrote (anyone who can publish to the broker):
    an entry of another shape is left out, a retry count that is no count reads 0."""
    found: dict[str, Held] = {}
    for worker, reply in _query(task_ids).items():
        for task_id, entry in (reply if isinstance(reply, dict) else {}).items():
            try:
                state, info = entry
                retries = info.get("retries") if isinstance(info, dict) else 0
                found[str(task_id)] = Held(
                    str(state), str(worker), retries if type(retries) is int and retries > 0 else 0
                )
            except (TypeError, ValueError):
                continue
    return found


def _sent_at_of(raw: bytes | str | None) -> float:
    if raw is None:
        return EMPTY
    try:
        return plausible_sent_at(json.loads(raw)["headers"][SENT_AT])
    except (ValueError, KeyError, TypeError):
        return UNKNOWN  # a message from before this header existed, or not Celery's


def plausible_sent_at(sent: Any, *, now: float | None = None) -> float:
    """`sent` as a time a message was sent, or UNKNOWN if it cannot be one: not a finite
    number, or later than now by more than SAGA_CLOCK_SLACK. A head in the future would read
    every stalled chain before it as lost, and spend its re-publishing budget: whoever can
    write a message header or a remote-control reply must not be able to do that."""
    value = float(sent)
    if not math.isfinite(value) or value > (now or time.time()) + settings.SAGA_CLOCK_SLACK:
        return UNKNOWN
    return value


def queue_heads(queues: Iterable[str], *, taken: dict[str, float] | None = None) -> dict[str, float]:
    """When the oldest message waiting in each queue was sent (EMPTY, UNKNOWN or a time).

    On AMQP, where a queue cannot be peeked, a non-empty queue's head is the time the
    newest message a live worker took from it was sent (`taken`, from `taken_heads`): every
    message waiting there was delivered after that one, so it arrived after it (FIFO;
    SAGA_CLOCK_SLACK covers publishers' clocks and in-flight publishes)."""
    queues = sorted(set(queues))
    heads: dict[str, float] = {}
    try:
        with app.connection_for_read() as connection:
            # The transport's own channel (redis or amqp): its internals are untyped.
            channel: Any = connection.default_channel
            if is_redis():
                # kombu pushes on the left and workers pop from the right: -1 is the oldest.
                pipe = channel.client.pipeline(transaction=False)
                for queue in queues:
                    pipe.lindex(queue, -1)
                for queue, raw in zip(queues, pipe.execute(), strict=True):
                    heads[queue] = _sent_at_of(raw)
            else:
                for queue in queues:
                    try:
                        count = channel.queue_declare(queue=queue, passive=True).message_count
                    except Exception:  # a queue not declared yet holds nothing
                        channel = connection.channel()
                        count = 0
                    heads[queue] = (taken or {}).get(queue, UNKNOWN) if count else EMPTY
    except Exception:
        logger.warning("could not read the queues' heads from the broker", exc_info=True)
        heads = dict.fromkeys(queues, UNKNOWN)
    return heads


def broker_view(*, queues: Iterable[str], task_ids: Sequence[str]) -> BrokerView:
    """One look for the sweeper. The broadcast waits its whole timeout, hearing every worker
    that answers in it: a "lost" verdict re-publishes a step and spends its budget, so it
    must not come from a look that stopped at the number of workers seen before (a worker
    that joined since, holding the step, would be missed). It goes on a connection of its
    own, as the watchdog's: a broker restart can leave the process's pool deaf for seconds."""
    with app.connection_for_write() as control:
        # How far the workers have got before what they hold: a message taken between the
        # two broadcasts is then held, never taken and not held (which would read as lost).
        taken = {} if is_redis() else taken_heads(connection=control)
        held, answered = held_task_ids(task_ids, connection=control)
    return BrokerView(held=frozenset(held), heads=queue_heads(queues, taken=taken), workers_answered=answered)


# --- How far each worker has got in its queue (AMQP, whose queues cannot be peeked) ------

# Queue -> when the newest message this worker's consumer took from it was sent (SENT_AT).
_taken: dict[str, float] = {}


def taken_note(request: Any = None, **_: Any) -> None:
    """`task_received` receiver (a worker's main process, AMQP only): note when the message
    just taken was sent, under its queue (the routing key: each queue is bound by its name)."""
    try:
        queue, sent = request.delivery_info["routing_key"], plausible_sent_at(request.request_dict[SENT_AT])
    except (AttributeError, KeyError, TypeError, ValueError):
        return  # no time (a message from before SENT_AT), or not a task message
    # (A time in the future, forged, is UNKNOWN: it would hide this worker's real progress.)
    if queue and sent > _taken.get(queue, UNKNOWN):
        _taken[queue] = sent


@inspect_command()
def saga_taken(state: Any) -> dict[str, float]:
    """Queue -> when the newest message this worker took from it was sent (remote control)."""
    return dict(_taken)


def taken_heads(*, connection: Any = None) -> dict[str, float]:
    """Queue -> when the newest message any live worker took from it was sent: one
    broadcast, which stops once as many workers answered as the last whole look heard. A
    worker that does not answer in time only leaves a head lower (or unknown), which can
    make a lost message wait longer, never a waiting one look lost."""
    try:
        replies = app.control.broadcast(
            "saga_taken",
            reply=True,
            timeout=settings.SAGA_INSPECT_TIMEOUT,
            limit=_workers_seen or None,
            connection=connection,
        )
    except Exception:
        logger.warning("could not ask the workers how far they have got in their queues", exc_info=True)
        return {}
    heads: dict[str, float] = {}
    for reply in replies or []:
        for answer in reply.values() if isinstance(reply, dict) else []:
            for queue, sent in answer.items() if isinstance(answer, dict) else []:
                with contextlib.suppress(TypeError, ValueError):
                    heads[queue] = max(heads.get(queue, UNKNOWN), plausible_sent_at(sent))
    return heads


@dataclass(frozen=True)
class Whereabouts:
    verdict: str  # "held", "waiting" or "lost"
    wait: float = 0.0  # the longest queue wait seen on the chain's way (seconds)


def chain_whereabouts(
    *,
    queued_at: float,
    chain: Sequence[tuple[str, str, float]],
    view: BrokerView,
    now: float,
    report_queue: str = "saga",
    report_sent_by: float | None = math.inf,
) -> Whereabouts:
    """Where a stalled chain's current message can be, from one `BrokerView`.

    `chain` is the segment the store is waiting on, in order: (task id, queue, deadline in
    seconds) per step; its first step was queued at `queued_at`. The store does not know
    which of them the chain reached (progress is recorded at the pivot and at the chain's
    end), so each is considered in turn:

    - a live worker holds one of them: "held" (the chain is being worked on);
    - the message for step k was sent no later than L_k, where L_0 = queued_at + clock slack
      and L_{k+1} = L_k + deadline_k + the queue wait seen in step k's queue (the latest a
      healthy, if slow, chain publishes its next step). Queues are FIFO: if the oldest
      message waiting in step k's queue was sent after L_k, that step's message is no
      longer waiting there. The same holds for the chain's report (or failure report) in
      the coordinator's queue, after the last step. A caller that knows more about that
      report says so with `report_sent_by`: None if none can exist (no step of the chain
      has a stored failure, which Celery stores before it sends the report), or the
      latest it can have been sent (its failure's time plus the clock slack);
    - nowhere: "lost" (the message vanished, or a worker died with it and it was not
      returned): the sweeper re-publishes.

    Pure: unit-tested without a broker.
    """
    if any(task_id in view.held for task_id, _, _ in chain):
        return Whereabouts("held")
    latest = queued_at + settings.SAGA_CLOCK_SLACK
    longest = 0.0
    for _, queue, deadline in chain:
        head = view.heads.get(queue, EMPTY)
        wait = 0.0 if head == EMPTY else max(now - head, 0.0)
        longest = max(longest, wait)
        if head <= latest:
            return Whereabouts("waiting", wait=longest)
        latest += deadline + wait
    if report_sent_by is not None:
        head = view.heads.get(report_queue, EMPTY)
        wait = 0.0 if head == EMPTY else max(now - head, 0.0)
        longest = max(longest, wait)
        # A report's known time outranks the healthy chain's bound: a slow chain's step
        # (given more time at earlier looks) can fail after it.
        if head <= (latest if math.isinf(report_sent_by) else report_sent_by):
            return Whereabouts("waiting", wait=longest)
    return Whereabouts("lost", wait=longest)


# --- The watchdog: a dead worker's messages back in seconds (Redis) ---------------------


def _lock_seconds() -> float:
    """How long the look's lock lives if its holder dies without freeing it (a SIGKILLed
    worker): a look is one broadcast (SAGA_INSPECT_TIMEOUT) and a few Redis commands, so a
    few seconds. (It was 30 s: a sweeper killed during its look stopped every watchdog for
    longer than the visibility timeout of the test timings, whose restore then won.)"""
    return max(5.0, 3 * settings.SAGA_INSPECT_TIMEOUT)


def orphans_restore(*, now: float | None = None, spaced: bool = False, connection: Any = None) -> dict[str, int]:
    """Return to their queues the messages a worker took and that no live worker holds.

    Cheap when nothing is wrong: one round trip, a `ZRANGE` of the deliveries older than
    SAGA_ORPHAN_GRACE (a healthy step acknowledges its message in milliseconds; a slow one,
    or one waiting for its retry, is claimed by its live worker) and an `LRANGE` of each
    queue's delivering list (empty but for milliseconds: `_being_delivered_return`). Only
    when there are such deliveries does it ask the workers (one `query_task` broadcast). A message is restored
    when no worker has claimed it in two looks at least SAGA_ORPHAN_CONFIRM apart, so a
    worker slow to answer one broadcast does not get its message copied. Restoring is a
    transaction on kombu's `unacked` hash (as kombu's own restore is), so this, another
    watchdog and kombu's visibility-timeout restore never all put a message back. A copy
    restored by mistake would run twice, which every step survives (they are idempotent).

    With `spaced` (the workers' watchdogs), a look is skipped when another watchdog took
    one less than SAGA_ORPHAN_INTERVAL ago. `connection`: a broker connection to use (the
    watchdog keeps one), else one is opened for the call.
    """
    if not is_redis():
        return {}
    now = now or time.time()
    done = {"restored": 0, "suspected": 0}
    with contextlib.nullcontext(connection) if connection is not None else app.connection_for_write() as connection:
        channel: Any = connection.default_channel
        client = channel.client
        pipe = client.pipeline(transaction=False)
        pipe.zrange(
            channel.unacked_index_key, now - settings.SAGA_ORPHAN_GRACE, 0, desc=True, byscore=True, withscores=False
        )
        for queue in SERVICES:
            pipe.lrange(delivering_key(queue), 0, -1)
        old, *delivering = pipe.execute()
        being_delivered = [(queue, item) for queue, items in zip(SERVICES, delivering, strict=True) for item in items]
        if not old and not being_delivered:
            client.delete(SUSPECTS_KEY)
            return {}
        if spaced:
            spacing = max(int(settings.SAGA_ORPHAN_INTERVAL * 900), 1)  # ms: 90 %, for the timers' jitter
            if not client.set(LOOKED_KEY, now, nx=True, px=spacing):
                return {}
        # One look at a time: looks overlap (a slow broadcast; a watchdog in every worker,
        # on several hosts), and each must see the suspects the one before it wrote. Only
        # its owner frees the lock: a look slower than the lock must not free the next
        # look's. (Two looks that did overlap would only delay a restore: each restore
        # needs a suspicion written by an earlier look at least SAGA_ORPHAN_CONFIRM ago.)
        lock = client.lock(LOCK_KEY, timeout=_lock_seconds(), blocking=False)
        if not lock.acquire():
            return {}
        try:
            suspects = {_text(tag): float(seen) for tag, seen in client.hgetall(SUSPECTS_KEY).items()}
            still: dict[str, float] = {}
            _being_delivered_return(client, being_delivered, suspects, still, done, now=now)
            tags = [_text(tag) for tag in old]
            task_of: dict[str, str] = {}
            for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags) if tags else [], strict=True):
                try:
                    task_of[tag] = json.loads(raw)[0]["headers"]["id"]
                except (TypeError, ValueError, KeyError, IndexError):
                    continue  # acknowledged meanwhile, or not a Celery task
            # A look that may restore (a suspicion old enough) hears every worker that answers
            # within the timeout; one that can only suspect may stop at the number of workers
            # seen before. A worker that joined since (a scale-up, a restart) is then missed
            # only by looks that restore nothing.
            ripe = any(suspects.get(tag, now) <= now - settings.SAGA_ORPHAN_CONFIRM for tag in task_of)
            # A connection of its own for the broadcast rather than the process's pool, which
            # a broker restart can leave stale (the look then hears no worker and restores
            # nothing). A look that broadcasts is at most one a second for the fleet.
            held: set[str] = set()
            if task_of:
                with app.connection_for_write() as control:
                    held, answered = held_task_ids(sorted(set(task_of.values())), early=not ripe, connection=control)
                if not answered:
                    # No worker answered at all: the control channel is in trouble, not them.
                    # Their suspicions stay as they were, for the next look.
                    still.update({tag: suspects[tag] for tag in task_of if tag in suspects})
                    task_of = {}
            for tag, task_id in task_of.items():
                if task_id in held:
                    continue
                if _confirmed(tag, suspects, still, done, now=now) and unacked_restore(channel, client, tag):
                    logger.warning("restored task %s: its worker died holding it (delivery %s)", task_id, tag)
                    done["restored"] += 1
            pipe = client.pipeline()
            pipe.delete(SUSPECTS_KEY)
            if still:
                pipe.hset(SUSPECTS_KEY, mapping=still)
            pipe.execute()
        finally:
            with contextlib.suppress(LockError):
                lock.release()
    return {key: value for key, value in done.items() if value}


def _confirmed(
    key: str, suspects: dict[str, float], still: dict[str, float], done: dict[str, int], *, now: float
) -> bool:
    """Whether `key` was suspected by a look at least SAGA_ORPHAN_CONFIRM ago; if not, it is
    suspected (still, or from now) in `still`, which the look writes back."""
    first_seen = suspects.get(key, now)
    if first_seen > now - settings.SAGA_ORPHAN_CONFIRM:
        still[key] = first_seen
        done["suspected"] += 1
        return False
    return True


def _being_delivered_return(
    client: Any,
    being_delivered: list[tuple[str, bytes]],
    suspects: dict[str, float],
    still: dict[str, float],
    done: dict[str, int],
    *,
    now: float,
) -> None:
    """Return the messages a worker took off a queue and never recorded as unacknowledged
    (common.kombu_fixes: it died, or lost its connection, in the milliseconds between).

    No worker is asked: a live one moves its message out of the delivering list in the
    transaction that records it, milliseconds after taking it, so a message seen there in
    two looks SAGA_ORPHAN_CONFIRM apart has no live taker. (A live worker whose main
    process stood still that long between the two would get a second copy, which every step
    survives.) Suspicions go into `still` under "delivering:<delivery tag>"."""
    for queue, item in being_delivered:
        try:
            message = json.loads(item)
            tag, task_id = message["properties"]["delivery_tag"], message["headers"].get("id")
        except (ValueError, TypeError, KeyError):
            tag, task_id = item[:64].hex() if isinstance(item, bytes) else str(item)[:64], None
        key = f"delivering:{tag}"
        if _confirmed(key, suspects, still, done, now=now) and delivering_return(client, queue, item):
            logger.warning("restored task %s: its worker died taking it off the %s queue", task_id, queue)
            done["restored"] += 1


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- Every worker runs the watchdog ----------------------------------------------------

_watchdog_stop = threading.Event()


# What a look meets while the broker is away (a restart): said once, not once a look.
BROKER_AWAY = (RedisConnectionError, RedisTimeoutError, OSError, OperationalError)


def _watchdog_loop() -> None:
    interval = settings.SAGA_ORPHAN_INTERVAL
    connection = None
    away = False
    while not _watchdog_stop.wait(interval * random.uniform(0.9, 1.1)):
        try:
            connection = connection or app.connection_for_write()
            orphans_restore(spaced=True, connection=connection)
        except Exception as error:  # a broker restart, a timeout: a new connection, and look again
            if not isinstance(error, BROKER_AWAY):
                logger.warning("the unacknowledged-message watchdog failed", exc_info=True)
            elif not away:
                logger.warning("the unacknowledged-message watchdog cannot reach the broker (%r): looking again", error)
                away = True
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.release()
            connection = None
        else:
            if away:
                logger.info("the unacknowledged-message watchdog reaches the broker again")
            away = False


def watchdog_start(**_: Any) -> None:
    """`worker_ready` receiver: every worker's main process looks for a dead worker's
    messages every SAGA_ORPHAN_INTERVAL (Redis only; RabbitMQ returns them itself), so any
    live worker, whatever its queue and however backed up the `saga` queue is, returns them.
    The thread only talks to Redis and broadcasts (no database), and is a daemon: a warm
    shutdown stops it (`watchdog_stop`), a SIGKILL takes it down with the worker."""
    if not is_redis() or settings.SAGA_ORPHAN_INTERVAL <= 0:
        return
    _watchdog_stop.clear()
    threading.Thread(target=_watchdog_loop, name="saga-orphan-watchdog", daemon=True).start()


def watchdog_stop(**_: Any) -> None:
    """`worker_shutdown` receiver."""
    _watchdog_stop.set()
