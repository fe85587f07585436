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

Upstream: celery/kombu#582 reports this very failure (`Channel.close` -> `_delete` ->
`conn_or_acquire` -> `_connparams`: `'NoneType' object has no attribute 'hostname'`); it
was closed without a fix for this path, which kombu 5.7.0 still takes. Written for kombu
PATCHED_VERSION only: `apply()` refuses another release, so an upgrade makes every test
fail until someone checks the patch against it. orders_project/tests/test_library_patches.py
fails once kombu stops raising AttributeError there: then remove this module.
"""

from importlib import metadata

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

PATCHED_VERSION = "5.7.0"
UPSTREAM_ISSUE = "celery/kombu#582"

# kombu's own method, kept to delegate to (and for the test that the bug is still there).
upstream_connparams = kombu_redis.Channel._connparams  # type: ignore[attr-defined]


def _connparams_of_a_live_connection(self, asynchronous=False):
    if getattr(self.connection, "client", None) is None:
        raise RedisConnectionError("this channel's broker connection is closed")
    return upstream_connparams(self, asynchronous=asynchronous)


def apply() -> None:
    """Patch kombu's Redis channel. Precondition: kombu is PATCHED_VERSION."""
    if (installed := metadata.version("kombu")) != PATCHED_VERSION:
        raise RuntimeError(
            f"orders_project.kombu_fixes patches kombu {PATCHED_VERSION}, not {installed}: check whether "
            f"{UPSTREAM_ISSUE} is fixed in it (then delete the patch) or re-check the patch and update PATCHED_VERSION"
        )
    kombu_redis.Channel._connparams = _connparams_of_a_live_connection  # type: ignore[attr-defined]
