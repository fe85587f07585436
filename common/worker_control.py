"""What a worker answers to a control command: nothing a Flower login may not read.

Anyone who can send a control command (a Flower login: Flower's worker pages and
`/api/workers` send them) asks a worker what it holds and how it is configured.

- **Held tasks**: `celery inspect active / reserved / scheduled / query_task` answer with
  each held request's `info()`. Celery's `info()` gives the real arguments unless asked for
  `safe=True`, which only `inspect active --safe` does (Flower passes it for running tasks,
  not for reserved or scheduled ones): a saga step's context (the customer's email, phone
  and card token) and its authority. `RedactedRequest` answers with the message's argument
  reprs, what the task events and logs show already (common.steps, saga.engine): ids only.
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
    """A held task, shown by its argument reprs whatever the caller asks for."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)


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


def register() -> None:
    """Replace the worker's `conf` control command with one that masks every URL's
    password. Call in the worker process (signals.worker_init), before it consumes."""
    from celery.worker import control

    celery_conf = control.conf

    @control.inspect_command(
        signature="[include_defaults=False]",
        args=[("with_defaults", control.strtobool)],
    )
    def conf(state: Any, with_defaults: bool = False, **kwargs: Any) -> Any:
        """List configuration, every URL's password masked (common.worker_control)."""
        return without_passwords(celery_conf(state, with_defaults=with_defaults, **kwargs))
