"""Three fixes for kombu 5.7's Redis transport, applied when the Celery app is created, and
the two ways a message goes back to its queue that every restorer shares
(`delivering_return`, `unacked_restore`).

**A torn-down connection is a connection error** (celery/kombu#582). When the broker
connection drops while a worker holds unacknowledged messages (always, with acks_late and
a task running), two things reach for a *new* Redis client through a channel whose
connection has already been torn down: closing the channel (to push the unacknowledged
messages back) and, after the worker reconnected, acknowledging a task that was running on
the old channel. Building that client reads connection details the torn-down connection
has released, which raises `AttributeError: 'NoneType' object has no attribute 'hostname'`.
kombu does not count that as a connection error, so the worker dies ("Unrecoverable
error") instead of carrying on. Seen here on every Redis restart; tests/test_faults.py
reproduces it. The fix reports that case as what it is, a connection error, which both
paths already handle (the close ignores it; the ack is logged as not done). Nothing is
lost: those messages stay in Redis's unacknowledged index, and `restore_visible` (every
worker runs it) returns them to their queues once their visibility timeout has passed; the
steps are idempotent, so running one again is safe. celery/kombu#582 reports this very
failure (`Channel.close` -> `_delete` -> `conn_or_acquire` -> `_connparams`); it was
closed without a fix for this path, which kombu 5.7.0 still takes.

**One Redis client per channel, not one per command** (redis/redis-py#3624). kombu builds a
new `redis.Redis` around the channel's connection pool for every command it sends outside
the event loop: each publish, each task event, each acknowledgement and each message a
worker reserves. redis-py rebuilds its whole response-callback table (about 170 entries,
upper-cased one by one) in every `Redis()`: 68 us each on these cores, 19 % of a worker's
main process at saturation (py-spy) and 14 % of a web request's CPU (cProfile), BENCHMARKS.md,
twelfth run.
A `Redis` given a pool holds no connection of its own: each command checks one out of the
pool and returns it, so one client per pool serves every command the channel sends
(redis-py documents clients as safe to share between threads), while a pipeline stays one
per use. The client is rebuilt when the channel's pool is (kombu drops its pools when the
connection closes), and the event loop's asynchronous client is kombu's own, untouched.

**A message a worker takes is never only in its memory** (celery/celery#7950,
celery/kombu#1836). kombu takes a message off its queue with BRPOP and records it as
unacknowledged (the `unacked` hash, which every restore reads) in a second round trip,
after the reply has crossed the network and been parsed. A worker SIGKILLed in between
loses the message for good: it is in no queue, no hash, no other process. Seen here in a
`make chaos` run, a notifications worker killed 2 ms after a failed order's notice was
published to it. With `apply(delivery_kept=queues)` (the product's app, for its five
queues; the bench's bare chain keeps kombu's way) a channel that consumes one of those
queues, and only it, takes its message with
`BLMOVE queue -> DELIVERING_PREFIX + queue`, an atomic move into a list of the messages
being delivered, and removes it from there in the same transaction that records it as
unacknowledged. So a message is always in the queue, in that list, or in the `unacked`
hash. A message left in the list (its taker died, or lost its connection, before
recording it) is put back by the workers' watchdog (saga.recovery.orphans_restore). The
cost is one LREM in the transaction kombu already runs per message. A channel consuming
several lists (several queues, or several priorities: BLMOVE moves from one list only),
or another queue (a broadcast's replies, consumed without acknowledgement), keeps BRPOP;
the product's workers each consume one queue, and its broker transport
options keep one priority (settings.CELERY_BROKER_TRANSPORT_OPTIONS).

Written for kombu PATCHED_VERSION only: `apply()` refuses another release, so an upgrade
makes every test fail until someone checks the patches against it.
orders_project/tests/test_library_patches.py fails once an upstream fix lands: then remove
that patch.
"""

import json
import threading
from collections.abc import Iterable
from importlib import metadata
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import ConnectionError as RedisConnectionError

PATCHED_VERSION = "5.7.0"
UPSTREAM_ISSUE = "celery/kombu#582"
CLIENT_UPSTREAM_ISSUE = "redis/redis-py#3624"
DELIVERY_UPSTREAM_ISSUE = "celery/kombu#1836"
# A queue's list of the messages being delivered: taken off the queue, not yet recorded as
# unacknowledged. Empty but for a few milliseconds after each take (Redis then drops the key).
DELIVERING_PREFIX = "delivering:"

# kombu's own methods, kept to delegate to (and for the tests that the bugs are still there).
upstream_connparams = kombu_redis.Channel._connparams  # type: ignore[attr-defined]
upstream_create_client = kombu_redis.Channel._create_client  # type: ignore[attr-defined]
upstream_brpop_start = kombu_redis.Channel._brpop_start  # type: ignore[attr-defined]
upstream_brpop_read = kombu_redis.Channel._brpop_read  # type: ignore[attr-defined]
upstream_qos_append = kombu_redis.QoS.append
# Where a channel keeps its one client, with the pool it was made for.
_CLIENT_ATTR = "_kombu_fixes_sync_client"


def _connparams_of_a_live_connection(self, asynchronous=False):
    if getattr(self.connection, "client", None) is None:
        raise RedisConnectionError("this channel's broker connection is closed")
    return upstream_connparams(self, asynchronous=asynchronous)


def _create_client_once_per_pool(self, asynchronous=False):
    if asynchronous:
        return upstream_create_client(self, asynchronous=True)
    pool = self.pool  # a new one after kombu dropped the old (a closed connection)
    kept = self.__dict__.get(_CLIENT_ATTR)
    if kept is not None and kept[0] is pool:
        return kept[1]
    client = upstream_create_client(self)
    self.__dict__[_CLIENT_ATTR] = (pool, client)
    return client


def delivering_key(queue: str) -> str:
    return f"{DELIVERING_PREFIX}{queue}"


# The message being delivered by this thread's channel: (its delivering list, the exact bytes
# taken). Set from the take to the transaction that records it (`_append_and_keep_no_copy`),
# which may run on another channel of the same connection (kombu's `_reject_inbound_message`).
_delivering = threading.local()
# A channel's attribute: the list its pending BLMOVE takes from, or None while it uses BRPOP.
_TAKING_ATTR = "_kombu_fixes_taking_from"
# The queues whose deliveries are kept (apply), which the watchdog returns from.
_kept_queues: frozenset[str] = frozenset()


def _brpop_start_kept(self, timeout=None):
    """kombu's `_brpop_start`, with BLMOVE where the channel consumes one list."""
    queues = self._queue_cycle.consume(len(self.active_queues))
    keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
    if len(keys) != 1 or keys[0] not in _kept_queues or self.global_keyprefix:
        self.__dict__[_TAKING_ATTR] = None
        return upstream_brpop_start(self, timeout)
    if timeout is None:
        timeout = self.brpop_timeout
    queue = keys[0]
    self.__dict__[_TAKING_ATTR] = queue
    self._in_poll = self.client.connection
    self._brpop_sent_at = monotonic()
    self.client.connection.send_command("BLMOVE", queue, delivering_key(queue), "RIGHT", "LEFT", timeout or 0)


def _brpop_read_kept(self, **options):
    """kombu's `_brpop_read` for a BLMOVE: the reply is the message alone."""
    queue = self.__dict__.get(_TAKING_ATTR)
    if queue is None:
        return upstream_brpop_read(self, **options)
    try:
        try:
            item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
        except self.connection_errors:
            self.client.connection.disconnect()
            raise
        if not item:
            raise Empty()
        self._queue_cycle.rotate(queue)
        _delivering.taken = (delivering_key(queue), item)
        try:
            self.connection._deliver(loads(bytes_to_str(item)), queue)
        finally:
            left = getattr(_delivering, "taken", None)
            _delivering.taken = None
            if left is not None:
                # Not recorded (a message kombu could not parse, or one consumed without
                # acknowledgement): kombu would have dropped it, and so do we, rather than
                # have the watchdog put it back for ever. A connection error here leaves
                # it in the list, which the watchdog then returns.
                self.client.lrem(left[0], 1, left[1])
        return True
    finally:
        self._in_poll = None
        self._flush_brpop_reauth()


def _append_and_keep_no_copy(self, message, delivery_tag):
    """kombu's `QoS.append`, which also takes the message out of its delivering list, in
    the same transaction that records it as unacknowledged."""
    taken = getattr(_delivering, "taken", None)
    if taken is None:
        return upstream_qos_append(self, message, delivery_tag)
    _delivering.taken = None
    delivery = message.delivery_info
    record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
    with self.pipe_or_acquire() as pipe:
        pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(self.unacked_key, delivery_tag, record).lrem(
            taken[0], 1, taken[1]
        ).execute()
        virtual.QoS.append(self, message, delivery_tag)


# Put a message back at the head of its queue (where BLMOVE took it from), once: only the
# caller that removed it from the delivering list pushes it.
_RETURN_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def delivering_return(client: Any, queue: str, item: bytes) -> bool:
    """Put `item`, left in `queue`'s delivering list, back at the head of the queue, marked
    redelivered as kombu's own restore marks it; whether it was still there (its taker may
    have recorded it meanwhile, or another watchdog returned it). Atomic (one script)."""
    again: bytes | str = item  # not a kombu message as we know it: returned as it was
    try:
        payload = json.loads(item)
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
        again = json.dumps(payload)
    except (ValueError, TypeError, KeyError):
        pass
    return bool(client.eval(_RETURN_SCRIPT, 2, delivering_key(queue), queue, item, again))


def unacked_restore(channel: Any, client: Any, tag: str) -> bool:
    """Put the unacknowledged delivery `tag` back at the head of its queue, as kombu's
    `QoS.restore_by_tag` does (same transaction on the `unacked` hash), and say whether it
    was still there: kombu's own restore, another restorer, or the message's
    acknowledgement may have won. `channel`: any Redis channel of the broker's vhost."""
    restored = False

    def restore_transaction(pipe: Any) -> None:
        nonlocal restored
        raw = pipe.hget(channel.unacked_key, tag)
        pipe.multi()
        pipe.zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag)
        if raw:
            payload, exchange, routing_key = json.loads(raw)
            channel._do_restore_message(payload, exchange, routing_key, pipe, False)
            restored = True

    client.transaction(restore_transaction, channel.unacked_key)
    return restored


def apply(*, delivery_kept: Iterable[str] = ()) -> None:
    """Patch kombu's Redis channel; for the queues `delivery_kept`, also the delivery (above).
    Precondition: kombu is PATCHED_VERSION."""
    if (installed := metadata.version("kombu")) != PATCHED_VERSION:
        raise RuntimeError(
            f"common.kombu_fixes patches kombu {PATCHED_VERSION}, not {installed}: check whether {UPSTREAM_ISSUE}, "
            f"{CLIENT_UPSTREAM_ISSUE} and {DELIVERY_UPSTREAM_ISSUE} are fixed in it (then delete that patch) or "
            "re-check the patches and update PATCHED_VERSION"
        )
    kombu_redis.Channel._connparams = _connparams_of_a_live_connection  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client_once_per_pool  # type: ignore[attr-defined]
    global _kept_queues
    _kept_queues = frozenset(delivery_kept)
    if _kept_queues:
        kombu_redis.Channel._brpop_start = _brpop_start_kept  # type: ignore[attr-defined]
        kombu_redis.Channel._brpop_read = _brpop_read_kept  # type: ignore[attr-defined]
        kombu_redis.QoS.append = _append_and_keep_no_copy  # type: ignore[method-assign]
