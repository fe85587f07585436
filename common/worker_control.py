"""What a worker answers to a control command: nothing a Flower login may not read.

Anyone who can send a control command (a Flower login: Flower's worker pages and
`/api/workers` send them) asks a worker what it holds and how it is configured.

- **Held tasks**: `celery inspect active / reserved / scheduled / query_task` answer with
  each held request's `info()`. Celery's `info()` gives the real arguments unless asked for
  `safe=True`, which only `inspect active --safe` does (Flower passes it for running tasks,
  not for reserved or scheduled ones): a saga step's context (the customer's email, phone
  and card token) and its authority. `RedactedRequest` answers with the message's argument
  reprs, what the task events and logs show already (common.steps, saga.engine): ids only.
- **Messages it cannot run** (a task it does not register, a body it cannot decode, a
  message that is not a task): Celery logs the body's first 1,024 characters at ERROR, a
  step's whole context and authority. A worker moved onto another service's queue (Flower
  lets a login add a queue to a worker) put every customer message of that queue into its
  log. `body_shown` logs the message's ids and argument reprs instead.
- **Its queues**: `add_consumer` (Flower's worker page, "Queues") moved a worker onto
  another service's queue, where it discarded every message as a task it does not
  register (and, with Celery's logging, logged it): each such saga then waited for its
  step's deadline. A worker consumes only its own service's queue (the one
  `CELERY_SERVICE` names, orders_project.celery); `add_consumer` refuses any other.
- **Configuration**: `celery inspect conf` (Flower's "Config" tab) answers with the
  settings. Celery masks the settings whose names look secret and the broker's URL by the
  name `broker_url`, which our `CELERY_` namespace misses: the broker's URL with its
  password, and the cache's and the breaker's Redis URLs (the broker's, by default), were
  shown whole. `conf` here masks the password in every URL-like value as well.
"""

from collections.abc import Mapping
from typing import Any

from celery.worker.request import Request

MASK = "********"


class RedactedRequest(Request):
    """A held task, shown by its argument reprs whatever the caller asks for, with how
    many times it was retried (the admin's timeline counts a held step's attempts by it)."""

    def info(self, safe: bool = False) -> Any:
        return {**super().info(safe=True), "retries": self.request_dict.get("retries") or 0}


def body_shown(m: Any, body: Any) -> str:
    """What a worker logs of a message it cannot run, for Celery's `dump_body`: its size
    and the ids and argument reprs of its headers (the reprs our publishers set: ids only),
    never the body."""
    from kombu.utils.encoding import safe_repr

    headers = getattr(m, "headers", None) or {}
    raw = getattr(m, "body", None)
    shown = {key: headers.get(key) for key in ("task", "id", "argsrepr", "kwargsrepr") if headers.get(key)}
    return f"<body of {len(raw) if raw is not None else 0}b not shown; {safe_repr(shown)[:512]}>"


def without_passwords(value: Any) -> Any:
    """`value` with the password of every URL in it masked (mappings and lists walked). Pure."""
    from kombu.utils.url import maybe_sanitize_url

    if isinstance(value, Mapping):
        return {key: without_passwords(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_passwords(item) for item in value]
    if isinstance(value, str) and "://" in value:
        return maybe_sanitize_url(value, mask=MASK)
    return value


def register(own_queue: str | None) -> None:
    """Replace the worker's `conf` control command with one that masks every URL's
    password, its `add_consumer` with one that adds `own_queue` only (None: no queue), and
    what it logs of a message it cannot run with `body_shown`. Call in the worker process
    (signals.worker_init), before it consumes."""
    from celery.utils.serialization import strtobool
    from celery.worker import control
    from celery.worker.consumer import consumer

    # Looked up by name at each call (Consumer.on_unknown_task, on_invalid_task,
    # on_decode_error, _message_report): tests/test_messages.py checks a live worker.
    consumer.dump_body = body_shown

    celery_conf = control.Panel.data["conf"]
    celery_add_consumer = control.Panel.data["add_consumer"]

    @control.inspect_command(
        signature="[include_defaults=False]",
        args=[("with_defaults", strtobool)],
    )
    def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> Any:
        """List configuration, every URL's password masked (common.worker_control)."""
        return without_passwords(celery_conf(state, with_defaults=with_defaults, **kwargs))

    @control.control_command(
        args=[("queue", str), ("exchange", str), ("exchange_type", str), ("routing_key", str)],
        signature="<queue> [exchange [type [routing_key]]]",
    )
    def add_consumer(state: Any, queue: str, *args: Any, **kwargs: Any) -> Any:
        """Tell a worker to consume from its own service's queue again, and no other
        (common.worker_control)."""
        if queue != own_queue:
            return {"error": f"refused: this worker consumes only its own queue ({own_queue or 'none'}), not {queue}"}
        return celery_add_consumer(state, queue, *args, **kwargs)
