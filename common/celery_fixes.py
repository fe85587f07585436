"""A fix for Celery 5.7's worker state, applied when the Celery app is created.

**A retry waiting out its countdown is unregistered by the attempt that published it.** A
worker keeps the requests it holds in `celery.worker.state.requests`, by task id; that is
what `query_task` answers from (the sweeper's and the watchdog's "which worker holds this?",
the admin's live steps). A task that retries publishes its next attempt under the same task
id, and the worker usually receives it (a countdown: `task_scheduled`, registered under that
id) before the attempt that published it has reported back from its pool process (the
attempt first stores its RETRY state in the result backend). That attempt's end then calls
`task_ready`, which pops `requests[task_id]` whatever request it holds: the next attempt's.
From then until its countdown ends, the worker holds the retry and says it does not: a
compensation retrying through a provider outage looked lost to the sweeper (CI, 2026-12-07;
the sweeper reads stored retries for that reason too, saga.sweeper `_outcomes_stored`) and
the admin showed its step held nowhere. `celery inspect scheduled` reads the timer, not
`requests`, so it did show it.

The fix: after upstream's `task_ready`, the request another attempt registered under the
same id is put back; so only the request that ended is unregistered. No upstream issue was found for it
(searched 2026-12-07); UPSTREAM_ISSUE names the code.

Written for Celery PATCHED_VERSION only: `apply()` refuses another release, so an upgrade
makes every test fail until someone checks the patch against it.
orders_project/tests/test_library_patches.py fails once upstream `task_ready` stops popping
another request: then remove this module.
"""

from importlib import metadata
from typing import Any

from celery.worker import request as _request
from celery.worker import state as _state

# Their stubs leave out the internals patched here.
state: Any = _state
worker_request: Any = _request

PATCHED_VERSION = "5.7.0"
UPSTREAM_ISSUE = "celery.worker.state.task_ready (requests.pop by task id)"

# Celery's own function: the patch delegates to it (and a test checks the bug is still there).
upstream_task_ready = state.task_ready


def task_ready_own_request(request: Any, successful: bool = False) -> None:
    """Celery's `task_ready`, then the request registered under the same id put back if it
    is another one (a retry of `request` took the id since). Runs in the worker's main
    thread, as upstream's does: nothing registers a request between the two."""
    registered = state.requests.get(request.id)
    upstream_task_ready(request, successful)
    if registered is not None and registered is not request:
        state.requests[request.id] = registered


def apply() -> None:
    """Patch the worker's `task_ready` where Celery looks it up. Precondition: Celery is
    PATCHED_VERSION; called before a worker builds its request class (the app's creation)."""
    if (installed := metadata.version("celery")) != PATCHED_VERSION:
        raise RuntimeError(
            f"common.celery_fixes patches celery {PATCHED_VERSION}, not {installed}: check whether "
            f"{UPSTREAM_ISSUE} still pops another request (else delete the patch) and update PATCHED_VERSION"
        )
    state.task_ready = task_ready_own_request
    worker_request.task_ready = task_ready_own_request  # the Request methods' global
    # The request class a worker builds binds it as a default argument at import.
    defaults = list(worker_request.create_request_cls.__defaults__ or ())
    worker_request.create_request_cls.__defaults__ = tuple(
        task_ready_own_request if value is upstream_task_ready else value for value in defaults
    )
