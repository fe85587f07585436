"""A fix for billiard 4.3's picklable tracebacks, applied when the Celery app is created.

**A failed task's traceback copies every position of every function it passes through**
(celery/celery#8882, closed without a fix). When a task fails (a declined card is how a saga
is meant to fail: `PaymentDeclined` is raised), Celery describes the failure with billiard's
`ExceptionInfo`, whose `Traceback` copies each frame's code object into a picklable `_Code`.
On Python 3.11 and later (which the README requires) that copy keeps
`list(code.co_positions())`: a 4-tuple for every instruction of the function, wherever it
failed. Celery's `trace_task` alone is thousands of instructions. Measured here
(BENCHMARKS.md, thirteenth run, "What changed: a declined card's traceback"): 57 KB pickled per
declined charge, sent through the pool's pipe to the worker's main process and unpickled
there (1.4 ms of CPU between the two), and the pool processes' memory grew with every
decline (the payments worker's four processes by about 33 KB per charge at 10 % declines, to
`worker_max_memory_per_child` and a restart; 500 declines in one process: +103 MB that a
full collection did not give back).

A traceback needs, of each frame's positions, only the one at the instruction it stopped at
(Python's `traceback._get_code_position(code, tb_lasti)` reads `co_positions()` up to
`tb_lasti // 2`). So the `_Code` is built without the list, and its `Traceback` then keeps
that one position (`OnePosition`): the same text when the traceback is formatted, in a few
bytes.

Written for billiard PATCHED_VERSION only: `apply()` refuses another release, so an upgrade
makes every test fail until someone checks the patch against it.
orders_project/tests/test_library_patches.py fails once billiard stops copying every
position: then remove this module.

Loads nothing of Django: the bench's bare chain applies it too (a library fix is not the
saga's doing).
"""

import itertools
from collections.abc import Iterator
from importlib import metadata
from types import CodeType, TracebackType
from typing import Any

from billiard import einfo

PATCHED_VERSION = "4.3.2"
UPSTREAM_ISSUE = "celery/celery#8882"
NO_POSITION = (None, None, None, None)

# billiard's own methods, kept to delegate to (and for the test that the bug is still there).
upstream_code_init = einfo._Code.__init__
upstream_traceback_init = einfo.Traceback.__init__


class OnePosition:
    """A code object's positions as a traceback reads them: `position` for the instruction at
    `index`, no position for any other. Picklable: it travels to the worker's main process
    inside the failure's `ExceptionInfo`."""

    __slots__ = ("index", "position")

    def __init__(self, index: int, position: tuple[Any, Any, Any, Any]) -> None:
        self.index = index
        self.position = position

    @classmethod
    def of(cls, code: CodeType, lasti: int) -> "OnePosition":
        """The position of `code`'s instruction at byte offset `lasti` (a traceback's `tb_lasti`)."""
        index = max(lasti, 0) // 2
        return cls(index, next(itertools.islice(code.co_positions(), index, None), NO_POSITION))

    def __iter__(self) -> Iterator[tuple[Any, Any, Any, Any]]:
        # Finite, as upstream's list is: billiard copies a copy's positions with list().
        return itertools.chain(itertools.repeat(NO_POSITION, self.index), (self.position,))

    def __reduce__(self) -> tuple[Any, ...]:
        return (OnePosition, (self.index, self.position))


class _WithoutPositions:
    """A code object whose `co_positions()` is empty: what billiard's `_Code` copies then."""

    __slots__ = ("_code",)

    def __init__(self, code: CodeType) -> None:
        self._code = code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._code, name)

    def co_positions(self) -> Iterator[Any]:
        return iter(())


def _code_without_positions(self: Any, code: CodeType) -> None:
    # Only the Traceback that builds this knows which instruction matters (below).
    upstream_code_init(self, _WithoutPositions(code))


def _traceback_keeping_one_position(self: Any, tb: TracebackType, *args: Any, **kwargs: Any) -> None:
    upstream_traceback_init(self, tb, *args, **kwargs)
    self.tb_frame.f_code._co_positions = OnePosition.of(tb.tb_frame.f_code, tb.tb_lasti)


def apply() -> None:
    """Patch billiard's picklable traceback. Precondition: billiard is PATCHED_VERSION."""
    if (installed := metadata.version("billiard")) != PATCHED_VERSION:
        raise RuntimeError(
            f"common.billiard_fixes patches billiard {PATCHED_VERSION}, not {installed}: check whether "
            f"{UPSTREAM_ISSUE} is fixed in it (then delete the patch) or re-check it and update PATCHED_VERSION"
        )
    einfo._Code.__init__ = _code_without_positions  # type: ignore[method-assign]
    einfo.Traceback.__init__ = _traceback_keeping_one_position  # type: ignore[method-assign,assignment]
