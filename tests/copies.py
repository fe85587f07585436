"""A copy of a step message run in a thread of its own, for the tests that force one
interleaving of racing copies against the real databases (tests/test_payment_races.py,
tests/test_notification_races.py)."""

import threading
from typing import Any

from django.db import connections


class Copy(threading.Thread):
    """One copy of a step message: `fn(**kwargs)` in its own thread (its own database
    connections, closed when it ends). `outcome()` returns what it returned or raises
    what it raised."""

    def __init__(self, name: str, fn: Any, **kwargs: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.fn, self.kwargs = fn, kwargs
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(**self.kwargs)
        except BaseException as error:
            self.error = error
        finally:
            connections.close_all()

    def outcome(self) -> Any:
        self.join(30)
        assert not self.is_alive(), f"copy {self.name} did not finish"
        if self.error is not None:
            raise self.error
        return self.result
