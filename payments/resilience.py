"""Retries and a circuit breaker around the payment provider.

Retries are the task's (Celery `autoretry_for` with exponential backoff and jitter, see
common.steps): every provider failure that may pass becomes `GatewayUnavailable`, a
`TransientError`. The circuit breaker (pybreaker) counts those failures across *every*
worker process through Redis, opens after `PAYMENT_BREAKER_FAIL_MAX` in a row, fails fast
while open, and lets one probe through after `PAYMENT_BREAKER_RESET_SECONDS`. A decline
is an answer, not a failure: it never trips the breaker (nor does a voided charge).

A failed call says whether the provider may have acted on it, which the payment's attempt
record needs (payments.services): `CircuitOpen` never left this process, a
`ProviderError` was answered (nothing moved), `ProviderTimedOut` may still complete.
"""

import logging
from collections.abc import Callable
from functools import cache
from typing import TypeVar

import pybreaker
import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from .gateways import CardDeclined, ChargeVoided, GatewayUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CircuitOpen(GatewayUnavailable):
    """The call was refused before it left this process: the provider never saw it."""


class ProviderTimedOut(GatewayUnavailable):
    """The provider did not answer in time: it may still complete the call."""


class _LogTransitions(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old_state, new_state) -> None:
        logger.warning("payment provider circuit breaker: %s -> %s", old_state.name, new_state.name)


class OneTripRedisStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's shared Redis state at one round trip per successful call.

    pybreaker reads the state before each call (GET) and resets the failure count after
    each success (SET): two round trips on every charge. Here the state and the count are
    read together (MGET), and a success resets the count only if that read saw failures,
    or this process counted one since. Whoever counts a failure concurrently with our
    success is counted either way: calls in flight at once have no order to keep.

    Precondition: one call at a time per instance (pybreaker's breaker holds its lock for
    the length of a call; each worker process has its own breaker).
    """

    _failures_seen = True  # until the first read says otherwise

    def _read_state(self) -> str:
        try:
            state_bytes, counter = self._redis.mget(self._namespace("state"), self._namespace("fail_counter"))
        except redis.RedisError:
            self.logger.exception("RedisError: falling back to default circuit state")
            self._failures_seen = True
            return self._fallback_circuit_state
        self._failures_seen = counter not in (b"0", "0", 0)
        if state_bytes is None:
            # The state is gone from Redis (flushed): start again, as pybreaker does.
            self._initialize_redis_state(self._fallback_circuit_state)
            return self._fallback_circuit_state
        return state_bytes.decode("utf-8") if isinstance(state_bytes, bytes) else str(state_bytes)

    def _write_state(self, state: str) -> None:
        self._failures_seen = True  # a transition resets the count for real
        pybreaker.CircuitRedisStorage.state.fset(self, state)  # type: ignore[attr-defined]

    state = property(_read_state, _write_state)

    def increment_counter(self) -> None:
        self._failures_seen = True
        super().increment_counter()

    def reset_counter(self) -> None:
        if self._failures_seen:
            super().reset_counter()
            self._failures_seen = False


@cache
def provider_breaker() -> pybreaker.CircuitBreaker:
    """This process's breaker over the state every worker shares (Redis, if there is one)."""
    storage = None
    if settings.PAYMENT_BREAKER_REDIS_URL:
        # pybreaker stores bytes: no decode_responses on this client.
        client = redis.Redis.from_url(settings.PAYMENT_BREAKER_REDIS_URL, socket_timeout=2)
        storage = OneTripRedisStorage(pybreaker.STATE_CLOSED, client, namespace="payment-gateway")
    return new_breaker(storage)


def new_breaker(
    storage: pybreaker.CircuitBreakerStorage | None = None,
    *,
    fail_max: int | None = None,
    reset_timeout: float | None = None,
) -> pybreaker.CircuitBreaker:
    """A breaker as the payments worker runs it, over `storage` (memory if None); the
    limits default to the settings'.

    A call that fails and so opens the circuit (the failure that reaches `fail_max`, or a
    half-open probe) raises its own error, not pybreaker's `CircuitBreakerError`: that
    call *reached* the provider, and `call_provider` turns `CircuitBreakerError` into
    `CircuitOpen`, "never sent", which would end a charge attempt that timed out (and may
    still complete) as settled, and let a refund void without waiting for it.
    """
    return pybreaker.CircuitBreaker(
        fail_max=fail_max if fail_max is not None else settings.PAYMENT_BREAKER_FAIL_MAX,
        reset_timeout=reset_timeout if reset_timeout is not None else settings.PAYMENT_BREAKER_RESET_SECONDS,
        exclude=[CardDeclined, ChargeVoided],
        listeners=[_LogTransitions()],
        state_storage=storage,
        name="payment-gateway",
        throw_new_error_on_trip=False,
    )


def call_provider(call: Callable[..., T], **kwargs: object) -> T:
    """Call the gateway through the shared breaker; every transient outcome is GatewayUnavailable."""
    try:
        return provider_breaker().call(call, **kwargs)
    except pybreaker.CircuitBreakerError as error:
        raise CircuitOpen(f"payment provider circuit is open ({error})") from error
    except SoftTimeLimitExceeded as error:
        # The provider hung past the task's soft limit: retry with the same idempotency key,
        # which returns the first outcome if the provider did finish.
        raise ProviderTimedOut("payment provider did not answer in time") from error
    except redis.RedisError:
        # The breaker's shared state is unreachable (Redis restarting): it only protects
        # the provider, so call it directly. The idempotency key makes a repeat harmless if
        # the failure came after the provider had answered.
        logger.warning("circuit breaker state unavailable; calling the payment provider without it")
        try:
            return call(**kwargs)
        except SoftTimeLimitExceeded as error:
            raise ProviderTimedOut("payment provider did not answer in time") from error


def breaker_state() -> str:
    """The breaker's state as every worker process sees it: closed, open or half-open."""
    return provider_breaker().current_state


def breaker_reset() -> None:
    """Close the breaker now (an operator who knows the provider is back; tests)."""
    provider_breaker().close()
