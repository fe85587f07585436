"""Exceptions a saga step raises; their class name becomes the saga's failure fingerprint.

`StepFailed` and subclasses are business outcomes: never retried, they make the saga
compensate. `TransientError` is a technical hiccup: the task retries it with backoff.
Each takes one message argument so Celery's JSON result backend can carry it.
"""


class StepFailed(Exception):
    """A business failure: the saga must compensate."""


class StepRefused(StepFailed):
    """The step was compensated (tombstone) or its saga is no longer running."""


class TransientError(Exception):
    """A failure that may pass: retry with backoff."""


class InvalidMessage(StepFailed):
    """The message is malformed: acting on it could half-apply something."""
