"""The payment provider's circuit breaker over its shared Redis state (payments.resilience):
one round trip per successful charge, and still a breaker.

Against the test session's real Redis (the breaker's state lives where the workers'
does); each test has a namespace of its own, so no worker's breaker sees it.
"""

import uuid
from datetime import timedelta
from typing import Any

import pybreaker
import pytest
import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from payments import resilience
from payments.gateways import ProviderError
from payments.resilience import CircuitOpen, OneTripRedisStorage, ProviderTimedOut, call_provider, new_breaker


class CountingRedis(redis.Redis):
    """A Redis client that notes every command it sends (a pipeline would be one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


class Down(Exception):
    """The provider failing."""


@pytest.fixture
def client() -> Any:
    if not settings.PAYMENT_BREAKER_REDIS_URL:
        pytest.skip("the breaker keeps its state in Redis only on a Redis deployment")
    client = CountingRedis.from_url(settings.PAYMENT_BREAKER_REDIS_URL, socket_timeout=2)
    namespace = f"test-breaker-{uuid.uuid4()}"
    yield client, namespace
    for key in client.scan_iter(f"{namespace}:pybreaker:*"):
        client.delete(key)
    client.close()


def breaker(client: CountingRedis, namespace: str) -> pybreaker.CircuitBreaker:
    """A worker process's breaker over the shared state."""
    storage = OneTripRedisStorage(pybreaker.STATE_CLOSED, client, namespace=namespace)
    return new_breaker(storage, fail_max=3, reset_timeout=600)


def fail() -> None:
    raise Down()


def test_a_successful_call_costs_one_round_trip(client: Any) -> None:
    redis_client, namespace = client
    cb = breaker(redis_client, namespace)
    cb.call(lambda: "charged")  # the first read may find failures from before
    redis_client.sent.clear()
    assert cb.call(lambda: "charged") == "charged"
    assert redis_client.sent == ["MGET"]


def test_a_success_after_failures_resets_the_count(client: Any) -> None:
    redis_client, namespace = client
    cb = breaker(redis_client, namespace)
    for _ in range(2):
        with pytest.raises(Down):
            cb.call(fail)
    assert int(redis_client.get(f"{namespace}:pybreaker:fail_counter")) == 2
    cb.call(lambda: "charged")
    assert int(redis_client.get(f"{namespace}:pybreaker:fail_counter")) == 0
    # So two more failures do not open it: only failures in a row count.
    for _ in range(2):
        with pytest.raises(Down):
            cb.call(fail)
    assert cb.current_state == "closed"


def test_failures_counted_by_another_process_are_reset_by_a_success_here(client: Any) -> None:
    redis_client, namespace = client
    here, there = breaker(redis_client, namespace), breaker(redis_client, namespace)
    here.call(lambda: "charged")
    for _ in range(2):
        with pytest.raises(Down):
            there.call(fail)
    here.call(lambda: "charged")  # its read sees the other's failures
    assert int(redis_client.get(f"{namespace}:pybreaker:fail_counter")) == 0


def test_it_opens_for_every_process_and_closes_again(client: Any) -> None:
    redis_client, namespace = client
    here, there = breaker(redis_client, namespace), breaker(redis_client, namespace)
    for _ in range(2):
        with pytest.raises(Down):
            here.call(fail)
    with pytest.raises(Down):
        here.call(fail)  # the third in a row opens it (and says how it failed: it was called)
    assert there.current_state == "open"
    with pytest.raises(pybreaker.CircuitBreakerError):
        there.call(lambda: "charged")  # refused without calling the provider
    there.close()  # an operator who knows the provider is back
    assert here.call(lambda: "charged") == "charged"
    assert here.current_state == "closed"
    assert int(redis_client.get(f"{namespace}:pybreaker:fail_counter")) == 0


def test_a_flushed_state_starts_closed_again(client: Any) -> None:
    redis_client, namespace = client
    cb = breaker(redis_client, namespace)
    for key in redis_client.scan_iter(f"{namespace}:pybreaker:*"):
        redis_client.delete(key)
    assert cb.call(lambda: "charged") == "charged"
    assert redis_client.get(f"{namespace}:pybreaker:state") == b"closed"


def test_the_call_that_opens_the_circuit_says_how_it_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that opens the circuit reached the provider: the payment's attempt record
    must hear what happened to it (answered, or may still complete), never "not sent"."""
    cb = new_breaker(pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED), fail_max=1, reset_timeout=600)
    monkeypatch.setattr(resilience, "provider_breaker", lambda: cb)

    def answered_with_an_error() -> None:
        raise ProviderError("the provider answered 500")

    with pytest.raises(ProviderError) as answered:
        call_provider(answered_with_an_error)
    assert not isinstance(answered.value, CircuitOpen)
    assert cb.current_state == "open"

    reached: list[int] = []
    with pytest.raises(CircuitOpen):
        call_provider(lambda: reached.append(1))  # refused: it never left this process
    assert reached == []

    # The probe after the reset time hangs past the soft time limit: it opens the circuit
    # again, and may still complete at the provider.
    cb._state_storage.opened_at = cb._state_storage.opened_at - timedelta(seconds=601)

    def hangs() -> None:
        raise SoftTimeLimitExceeded()

    with pytest.raises(ProviderTimedOut):
        call_provider(hangs)
    assert cb.current_state == "open"
