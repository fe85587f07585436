"""Exceptions a saga step raises; their class name becomes the saga's failure fingerprint.

`StepFailed` and subclasses are never retried: they make the saga compensate. Of those, a
`BusinessFailure` is how a saga is meant to fail (a declined card, no stock, a refused
late copy), which the worker logs at INFO as expected (common.steps); `InvalidMessage` is
an error, a bug or a forgery, logged at ERROR with its traceback. `TransientError` is a
technical hiccup: the task retries it with backoff.
Each takes one message argument so Celery's JSON result backend can carry it.
"""


class StepFailed(Exception):
    """A failure the step must not retry: the saga must compensate."""


class BusinessFailure(StepFailed):
    """A failure the saga is designed to have: compensating is the whole answer."""


class StepRefused(BusinessFailure):
    """The step was compensated (tombstone) or its saga is no longer running."""


class TransientError(Exception):
    """A failure that may pass: retry with backoff."""


class InvalidMessage(StepFailed):
    """The message is malformed: acting on it could half-apply something."""
