"""Two fixes for kombu 5.7's Redis transport, applied when the Celery app is created.

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

Written for kombu PATCHED_VERSION only: `apply()` refuses another release, so an upgrade
makes every test fail until someone checks the patches against it.
orders_project/tests/test_library_patches.py fails once an upstream fix lands: then remove
that patch.
"""

from importlib import metadata

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

PATCHED_VERSION = "5.7.0"
UPSTREAM_ISSUE = "celery/kombu#582"
CLIENT_UPSTREAM_ISSUE = "redis/redis-py#3624"

# kombu's own methods, kept to delegate to (and for the tests that the bugs are still there).
upstream_connparams = kombu_redis.Channel._connparams  # type: ignore[attr-defined]
upstream_create_client = kombu_redis.Channel._create_client  # type: ignore[attr-defined]
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


def apply() -> None:
    """Patch kombu's Redis channel. Precondition: kombu is PATCHED_VERSION."""
    if (installed := metadata.version("kombu")) != PATCHED_VERSION:
        raise RuntimeError(
            f"common.kombu_fixes patches kombu {PATCHED_VERSION}, not {installed}: check whether {UPSTREAM_ISSUE} "
            f"and {CLIENT_UPSTREAM_ISSUE} are fixed in it (then delete that patch) or re-check the patches and "
            "update PATCHED_VERSION"
        )
    kombu_redis.Channel._connparams = _connparams_of_a_live_connection  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client_once_per_pool  # type: ignore[attr-defined]
