"""The write throttle (common.drf.WriteRateThrottle, common.ratelimit) through a DRF view,
on the configured cache (Redis in `make test`) and on Django's local-memory cache, with a
clock the test moves: no sleeps."""

import logging
import secrets
import socket
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIRequestFactory
from rest_framework.views import APIView

from common.drf import WriteRateThrottle

WINDOW = 60
START = 1_800_000_000.0  # a window boundary (a multiple of 60)
LOCMEM = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "rate-limit-tests"}}


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


class WriteView(APIView):
    authentication_classes: list = []
    permission_classes: list = []
    throttle_classes = [WriteRateThrottle]
    throttle_scope = "test_writes"

    def get(self, request: Request) -> Response:
        return Response({})

    def post(self, request: Request) -> Response:
        return Response({}, status=201)


@pytest.fixture(params=["configured", "locmem"])
def cache_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "configured":
        yield request.param
    else:
        with override_settings(CACHES=LOCMEM):
            yield request.param
            caches["default"].clear()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(WriteRateThrottle, "timer", clock)
    monkeypatch.setattr(WriteRateThrottle, "THROTTLE_RATES", {"test_writes": "3/minute"})
    return clock


class Client:
    """An anonymous client with an address of its own (TEST-NET-2), so runs never share counts."""

    def __init__(self) -> None:
        self.address = f"198.51.100.{secrets.randbelow(254) + 1}-{secrets.token_hex(4)}"
        self.factory = APIRequestFactory()

    def post(self) -> Response:
        return WriteView.as_view()(self.factory.post("/", {}, format="json", REMOTE_ADDR=self.address))

    def get(self) -> Response:
        return WriteView.as_view()(self.factory.get("/", REMOTE_ADDR=self.address))


def statuses(client: Client, n: int) -> list[int]:
    return [client.post().status_code for _ in range(n)]


def test_the_limit_answers_429_with_retry_after(cache_kind: str, clock: Clock) -> None:
    client = Client()
    clock.now = START + 10

    answers = [client.post() for _ in range(5)]

    assert [a.status_code for a in answers] == [201, 201, 201, 429, 429]
    # The burst is one window old at START + 70: that is when the next one is admitted.
    assert answers[3]["Retry-After"] == "60"
    assert answers[3].data["detail"].startswith("Request was throttled.")
    # Per client, and only writes.
    assert client.get().status_code == 200
    assert Client().post().status_code == 201


def test_a_new_window_admits_again_once_the_burst_is_a_window_old(cache_kind: str, clock: Clock) -> None:
    client = Client()
    clock.now = START + 10
    assert statuses(client, 4) == [201, 201, 201, 429]

    clock.now = START + 69  # the next fixed window, but the burst is not yet a window old
    assert statuses(client, 1) == [429]
    clock.now = START + 70
    assert statuses(client, 4) == [201, 201, 201, 429]


def test_retry_after_never_exceeds_the_window_and_waiting_that_long_is_enough(cache_kind: str, clock: Clock) -> None:
    client = Client()
    refused = 0
    # Requests at uneven gaps across several windows, waiting as told after each 429.
    for gap in (0, 1, 1, 38, 1, 18, 2, 39, 0, 0, 30, 29, 1, 5, 0, 55, 3):
        clock.now += gap
        answer = client.post()
        if answer.status_code == 429:
            refused += 1
            wait = int(answer["Retry-After"])
            assert 0 < wait <= WINDOW
            clock.now += wait
            assert client.post().status_code == 201
    assert refused >= 3


def test_rejected_requests_are_not_counted(cache_kind: str, clock: Clock) -> None:
    client = Client()
    clock.now = START + 10
    assert statuses(client, 3) == [201, 201, 201]
    assert statuses(client, 50) == [429] * 50
    clock.now = START + 70
    assert statuses(client, 4) == [201, 201, 201, 429]


def test_requests_go_through_when_the_cache_is_down(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    down = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": f"redis://127.0.0.1:{port}/0"}
    }
    client = Client()
    with override_settings(CACHES=down), caplog.at_level(logging.WARNING, logger="common.drf"):
        assert statuses(client, 5) == [201] * 5
    assert "rate limit not applied: the cache is unavailable" in caplog.text
    # One line per request, naming the error: no traceback.
    lines = [r for r in caplog.records if r.name == "common.drf"]
    assert len(lines) == 5 and all(r.exc_info is None and "ConnectionError" in r.getMessage() for r in lines)


def test_the_configured_cache_is_redis_in_make_test() -> None:
    # The Redis path is the one production takes; make test's cache is the broker's Redis.
    if not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("the broker is not Redis: the configured cache may be local memory")
    assert settings.CACHES["default"]["BACKEND"] == "django.core.cache.backends.redis.RedisCache"


def test_on_redis_a_request_builds_no_client(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """One client per process: Django's cache would build a `redis.Redis` per operation."""
    if settings.CACHES["default"]["BACKEND"] != "django.core.cache.backends.redis.RedisCache":
        pytest.skip("the configured cache is not Redis")
    client = Client()
    client.post()
    built = []
    original = redis.Redis.__init__
    monkeypatch.setattr(redis.Redis, "__init__", lambda self, *a, **kw: built.append(1) or original(self, *a, **kw))
    assert statuses(client, 4) == [201, 201, 429, 429]
    assert built == []


class PerAddressView(WriteView):
    throttle_per_address = True


def test_a_view_counted_per_address_counts_signed_in_callers_per_address_too(
    cache_kind: str, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token endpoint: signed in with a token of their own, a caller was counted per
    user, so each account named in the bodies added its own allowance of guesses."""
    from types import SimpleNamespace

    address = f"198.51.100.{secrets.randbelow(254) + 1}-{secrets.token_hex(4)}"
    factory = APIRequestFactory()

    def post(view: type[APIView], user_pk: int) -> int:
        request = factory.post("/", {}, format="json", REMOTE_ADDR=address)
        caller = SimpleNamespace(pk=user_pk, is_authenticated=True, is_active=True)
        monkeypatch.setattr(view, "authentication_classes", [_As(caller)])
        return view.as_view()(request).status_code

    # Per address: three guesses in all, whoever the caller signs in as.
    assert [post(PerAddressView, pk) for pk in (1, 2, 3, 4)] == [201, 201, 201, 429]
    # Elsewhere per user, as REST framework counts.
    assert [post(WriteView, pk) for pk in (5, 6, 7, 8)] == [201] * 4


def _As(user: object) -> type:
    class Authentication:
        def authenticate(self, request: Request) -> tuple[object, None]:
            return user, None

    return Authentication


def test_a_rate_the_throttle_would_misread_stops_the_start() -> None:
    from django.core.exceptions import ImproperlyConfigured

    from orders_project.security import rate_setting

    assert rate_setting("ORDER_CREATE_RATE", "30/minute") == "30/minute"
    assert rate_setting("AUTH_TOKEN_RATE", " 100000000/m ") == "100000000/m"
    for typo in ("30/5min", "30 per minute", "30/", "/minute", "0/minute", "-1/minute", "30/week", "thirty/minute"):
        with pytest.raises(ImproperlyConfigured, match="is not a rate"):
            rate_setting("ORDER_CREATE_RATE", typo)
