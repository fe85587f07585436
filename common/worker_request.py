"""What a worker shows of a task it holds: the message's argument reprs, never its arguments.

`celery inspect active / reserved / scheduled / query_task`, and Flower's worker pages and
`/api/workers` (which call the same), answer with each held request's `info()`. Celery's
`info()` gives the real arguments unless asked for `safe=True`, which only `inspect
active --safe` does (Flower passes it for active tasks, not for reserved or scheduled
ones): a saga step's context (the customer's email, phone and card token) and its
authority, to anyone who can send a control command (a Flower login). The reprs are what
the task events and logs show already (common.steps, saga.engine): ids only.
"""

from typing import Any

from celery.worker.request import Request


class RedactedRequest(Request):
    """A held task, shown by its argument reprs whatever the caller asks for."""

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)
