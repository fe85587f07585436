"""Reads of the saga store for operators (the admin)."""

from collections.abc import Iterable

from django.db.models import Count, Q, QuerySet

from .models import UNFINISHED_STATUSES, SagaInstance, fingerprint_of, fingerprint_parts


def sagas_with_fingerprints(fingerprints: Iterable[str]) -> QuerySet[SagaInstance]:
    """Sagas whose last failure has one of these fingerprints (`<exception type> @ <step>`);
    strings that are not fingerprints match nothing."""
    match = Q(pk__in=[])
    for fingerprint in fingerprints:
        try:
            failure_type, failure_step = fingerprint_parts(fingerprint)
        except ValueError:
            continue
        match |= Q(failure_type=failure_type, failure_step=failure_step)
    return SagaInstance.objects.filter(match)


def failure_fingerprint_counts() -> list[tuple[str, int]]:
    """Every failure fingerprint with how many sagas have it, most frequent first."""
    rows = (
        SagaInstance.objects.exclude(failure_type="")
        .values("failure_type", "failure_step")
        .annotate(n=Count("id"))
        .order_by("-n", "failure_type", "failure_step")
    )
    return [(fingerprint_of(row["failure_type"], row["failure_step"]), row["n"]) for row in rows]


def saga_version_counts() -> dict[tuple[str, int], int]:
    """How many unfinished sagas (running, compensating, needing attention) each
    (definition, version) has; versions with none are absent."""
    rows = (
        SagaInstance.objects.filter(status__in=UNFINISHED_STATUSES)
        .values("definition", "definition_version")
        .annotate(n=Count("id"))
        .values_list("definition", "definition_version", "n")
    )
    return {(name, version): n for name, version, n in rows}
