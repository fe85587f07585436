"""A fix for kombu 5.7's Redis transport, applied when the Celery app is created.

When the broker connection drops while a worker holds unacknowledged messages (always,
with acks_late and a task running), two things reach for a *new* Redis client through a
channel whose connection has already been torn down: closing the channel (to push the
unacknowledged messages back) and, after the worker reconnected, acknowledging a task
that was running on the old channel. Building that client reads connection details the
torn-down connection has released, which raises `AttributeError: 'NoneType' object has no
attribute 'hostname'`. kombu does not count that as a connection error, so the worker
dies ("Unrecoverable error") instead of carrying on. Seen here on every Redis restart;
tests/test_faults.py reproduces it.

The fix reports that case as what it is, a connection error, which both paths already
handle (the close ignores it; the ack is logged as not done). Nothing is lost: those
messages stay in Redis's unacked index, and `restore_visible` (every worker runs it)
returns them to their queues once their visibility timeout has passed; the steps are
idempotent, so running one again is safe.
"""

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

_connparams = kombu_redis.Channel._connparams  # type: ignore[attr-defined]


def _connparams_of_a_live_connection(self, asynchronous=False):
    if getattr(self.connection, "client", None) is None:
        raise RedisConnectionError("this channel's broker connection is closed")
    return _connparams(self, asynchronous=asynchronous)


def apply() -> None:
    kombu_redis.Channel._connparams = _connparams_of_a_live_connection  # type: ignore[attr-defined]
