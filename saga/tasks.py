"""The coordinator's tasks. Registered only in the saga worker (CELERY_SERVICE=saga)."""

from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from . import services

RETRY = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": None,  # the saga store must learn of every step outcome
}


@shared_task(name="saga.step_succeeded", **RETRY)
def step_succeeded(result: Any, *, saga_id: str, step: str) -> None:
    services.saga_step_succeeded(saga_id=saga_id, step_name=step, result=result if isinstance(result, dict) else {})


@shared_task(name="saga.step_failed", **RETRY)
def step_failed(task_id: str, *, saga_id: str, step: str) -> None:
    services.saga_step_failed(saga_id=saga_id, step_name=step, task_id=task_id)
