"""How a saga is declared: forward steps, their compensations, and the pivot.

A definition is data. The engine (`saga.engine`) turns it into Celery chains of
signatures called by task name, so the coordinator imports no participant code.

Definitions are versioned (issue 14): a saga runs to its end, compensations and operator
retries included, on the (name, version) it started with, which its SagaInstance stores;
new sagas start on the newest registered version. What a deployment registers is the
setting SAGA_DEFINITIONS (dotted paths of SagaDefinition objects), which the registry
loads on first use (`definitions_load`, below), the same in every process. A version may
leave that list only once no unfinished saga uses it: saga.checks refuses the start-up of
the coordinator's processes, `migrate` and `check --database orders` otherwise, and
`manage.py saga_versions` shows what is in use.
"""

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string


@dataclass(frozen=True)
class Step:
    """One local transaction in one service, called by Celery task name.

    `timeout` is how long the step may stay running before the saga considers it
    stalled (stored as the step's deadline); None means SAGA_STEP_TIMEOUT.

    `final_failures` are the failures (exception class names, as the result backend
    stores them) that the step records under its own idempotency key before it raises
    them: every copy of its message, at any time, raises the same again. After one, the
    step took no effect and never will, and no step after it ran (each needs the sealed
    output of the one before): their compensations have nothing to undo and no late
    message to stop, so the saga does not run them (`not_needed`). A declined card is
    one: the provider's decline is final for the charge's key.
    """

    name: str
    task: str
    compensation: "Step | None" = None
    timeout: int | None = None
    kwargs: Mapping[str, object] = field(default_factory=dict)
    final_failures: tuple[str, ...] = ()

    @property
    def deadline_seconds(self) -> int:
        from django.conf import settings

        return self.timeout or settings.SAGA_STEP_TIMEOUT


@dataclass(frozen=True)
class SagaDefinition:
    """A saga: forward steps in order, the pivot, and what runs after compensating.

    Steps up to and including the pivot may be compensated; steps after it are only
    retried (the order is confirmed: there is no going back). After the compensations,
    `after_compensation` steps run in order (mark the order failed, tell the customer).

    `version` tells apart two shapes of the same saga: a change to the steps (added,
    removed, renamed, reordered, another pivot) is a new version, never an edit of one
    that sagas may still be running on (docs/OPERATIONS.md, "Changing a saga").
    """

    name: str
    steps: tuple[Step, ...]
    pivot: str
    after_compensation: tuple[Step, ...] = ()
    # `fn(*, saga) -> str | None`, called when an operator compensates a saga by hand
    # (saga.operator.saga_compensate), before the saga row is locked. It must take the
    # lock the pivot step takes (in the pivot's lock order), and return why the saga can
    # no longer be compensated (the pivot committed), or None. Only the pivot's own
    # service knows whether it committed: the chain runs the pivot before the saga store
    # hears of the step before it. Without a guard, sagas cannot be compensated by hand.
    pivot_guard: Callable[..., str | None] | None = None
    # `fn(failure_type: str) -> str`: the fixed sentence the customer is told for a
    # failure of that kind. `saga_begin_compensation` puts it in the context as
    # `failure_reason` (what the after-compensation steps read); the raw error stays in the
    # saga's own `failure_reason`, for operators. Without it, customers are given no reason.
    customer_reason: Callable[[str], str] | None = None
    # Which shape of the saga this is (see above); what a saga stores and runs to its end on.
    version: int = 1
    # What makes a saga's provisional effects final once its pivot committed (a confirmed
    # order's held stock becomes a sale): a task that takes a list of saga ids, sent for a
    # batch of sagas by the coordinator's sweep, never as a step of each saga's chain
    # (saga.settlement). Its `timeout` is how long the coordinator waits for the batch to
    # be recorded before it sends those sagas again. None: nothing to settle.
    settlement: Step | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.steps]
        names += [s.compensation.name for s in self.steps if s.compensation]
        names += [s.name for s in self.after_compensation]
        names += [self.settlement.name] if self.settlement else []
        if len(names) != len(set(names)):
            raise ValueError(f"saga {self.name!r}: step names must be unique, got {names}")
        if self.pivot not in {s.name for s in self.steps}:
            raise ValueError(f"saga {self.name!r}: pivot {self.pivot!r} is not a forward step")
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"saga {self.name!r}: version must be a positive integer, got {self.version!r}")

    @property
    def pivot_index(self) -> int:
        return next(i for i, s in enumerate(self.steps) if s.name == self.pivot)

    def forward_index(self, name: str) -> int:
        for i, step in enumerate(self.steps):
            if step.name == name:
                return i
        raise KeyError(f"saga {self.name!r} has no forward step {name!r}")

    def is_after_pivot(self, name: str) -> bool:
        return self.forward_index(name) > self.pivot_index

    def compensation_steps(self) -> tuple[Step, ...]:
        """What runs when the saga fails or is cancelled before its pivot committed.

        Every compensable step is undone, newest first, whether or not it ran: a
        compensation that finds no forward effect leaves a tombstone, which makes a
        late or duplicate forward message refuse to act. That is what keeps a cancel
        that lands mid-saga safe without knowing which step is in flight.
        """
        undo = tuple(s.compensation for s in reversed(self.steps[: self.pivot_index + 1]) if s.compensation)
        return undo + self.after_compensation

    def compensations_not_needed(self, failure_step: str, failure_type: str) -> int:
        """How many of `compensation_steps()`, from the first, need not run because
        `failure_step` failed with one of its `final_failures` (`failure_type`): the
        compensations of that step and of the steps after it. 0 for any other failure, a
        cancel or an operator's decision: then every compensation runs."""
        at = next((i for i, s in enumerate(self.steps) if s.name == failure_step), None)
        if at is None or failure_type not in self.steps[at].final_failures:
            return 0
        never_ran = self.steps[at : self.pivot_index + 1]
        unneeded = {s.compensation.name for s in never_ran if s.compensation}
        plan = self.compensation_steps()
        return next((i for i, step in enumerate(plan) if step.name not in unneeded), len(plan))


# (name, version) -> definition: every version this process may run a saga on. Read only
# through `_registry()`, which fills it from SAGA_DEFINITIONS first.
_REGISTRY: dict[tuple[str, int], SagaDefinition] = {}
_LOADED = threading.Event()
_LOADING = threading.Lock()


def register(definition: SagaDefinition) -> SagaDefinition:
    """Make `definition` runnable in this process. Registering the same (name, version)
    twice is allowed only for the same definition: two shapes under one version would
    let a saga change steps mid-run."""
    key = (definition.name, definition.version)
    existing = _REGISTRY.get(key)
    if existing is not None and existing != definition:
        raise ValueError(f"saga {definition.name!r} version {definition.version} is already registered, differently")
    _REGISTRY[key] = definition
    return definition


def register_from_paths(paths: Iterable[str]) -> list[SagaDefinition]:
    """Register the SagaDefinition objects named by dotted paths (SAGA_DEFINITIONS).
    ImproperlyConfigured, naming the path, for one that does not import or is not a
    SagaDefinition: every caller is a start-up or a command that says so and stops."""
    registered = []
    for path in paths:
        try:
            definition = import_string(path)
        except ImportError as error:
            raise ImproperlyConfigured(f"SAGA_DEFINITIONS: cannot import {path!r}: {error}") from error
        if not isinstance(definition, SagaDefinition):
            raise ImproperlyConfigured(
                f"SAGA_DEFINITIONS: {path} is a {type(definition).__name__}, not a SagaDefinition"
            )
        registered.append(register(definition))
    return registered


def definitions_load() -> None:
    """Register the definitions this deployment runs, the setting SAGA_DEFINITIONS, once
    per process; every lookup below calls it first.

    The one place the deployment's sagas are registered. On first use, not at import or
    in `apps.ready()`, so the definitions' modules (orders.saga, with the callables it
    names) are imported after every app is ready. A process that acts on sagas uses the
    registry at start-up (saga.checks: the web process, the saga and orders workers,
    `migrate --database=orders`), so a wrong path still stops it there.
    """
    if _LOADED.is_set():
        return
    from django.conf import settings

    with _LOADING:
        if not _LOADED.is_set():
            register_from_paths(settings.SAGA_DEFINITIONS)
            _LOADED.set()


def _registry() -> dict[tuple[str, int], SagaDefinition]:
    definitions_load()
    return _REGISTRY


def registered_versions() -> dict[str, list[int]]:
    """Each registered saga name with its versions, oldest first."""
    versions: dict[str, list[int]] = {}
    for name, version in sorted(_registry()):
        versions.setdefault(name, []).append(version)
    return versions


def registered_definitions() -> list[SagaDefinition]:
    """Every definition this process may run a saga on, by (name, version)."""
    registry = _registry()
    return [registry[key] for key in sorted(registry)]


def get_definition(name: str, version: int | None = None) -> SagaDefinition:
    """The definition `name` at `version`; with no version, the newest registered one
    (what a new saga starts on). Every path that acts on an existing saga passes the
    saga's own `definition_version`. LookupError if this process does not have it."""
    if version is None:
        versions = registered_versions().get(name)
        if not versions:
            raise LookupError(f"no saga definition named {name!r}; known: {registered_versions()}")
        version = versions[-1]
    try:
        return _registry()[(name, version)]
    except KeyError:
        raise LookupError(
            f"saga definition {name!r} version {version} is not registered in this process "
            f"(SAGA_DEFINITIONS); registered: {registered_versions()}"
        ) from None
