"""Rate limits counted in O(1) per request, in one cache round trip (common.drf.WriteRateThrottle).

DRF's own throttles keep every request's timestamp in the window as one cached list, read
and written back (pickled) on every request: two round trips and work that grows with the
requests in the window (thousands under load). Here each key counts its requests per fixed
window (`n`), with the offsets of the window's first and last request (`f`, `l`), and a
request is admitted when the current window's count plus the part of the previous window's
still inside the sliding window stays within the limit: the sliding-window counter.

The usual counter assumes the previous window's requests were spread over all of it. This
one assumes they were spread between its first and last request, which it knows: a burst
then expires when it would in DRF's sliding log (at its age of one window), and a client
told to wait (`Retry-After`) is never told more than one window, as with DRF. Between the
two, the estimate may let through more or less than the sliding log would: a client that
times its requests against it gets up to twice the limit within one window's span (no
fixed window admits more than the limit, and a span meets two of them), never more.

A rejected request is not counted (as in DRF): its increment is taken back, which costs a
throttled client a second round trip. Counting is atomic, so concurrent requests cannot
pass the limit together.

On Redis (Django's RedisCache) the round trip is one pipeline on a client built once per
process: Django's cache builds a new `redis.Redis` for every operation, whose construction
costs more CPU than the commands. Any other cache (locmem in tests) counts with `add` and
`incr`, a few round trips.
"""

import functools
import math
from typing import Any

import redis
from django.conf import settings
from django.core.cache import caches
from django.utils.module_loading import import_string

CACHE_ALIAS = "default"
REDIS_CACHE = "django.core.cache.backends.redis.RedisCache"


def rate_limit_hit(key: str, *, limit: int, window: float, now: float) -> float | None:
    """Count a request against `key`'s `limit` per `window` seconds, at time `now` (seconds
    since the epoch). None if it is admitted (and counted); otherwise how many seconds
    until one would be, if nothing else is sent meanwhile (Retry-After), and it is not
    counted. Raises whatever the cache raises when it is unreachable.
    """
    if limit < 1:
        return float(window)
    index = math.floor(now / window)
    offset = now - index * window
    # Kept until the end of the next window, which reads it as its previous one.
    ttl = math.ceil((index + 2) * window - now) + 1
    cache = caches[CACHE_ALIAS]
    current, previous = cache.make_key(f"{key}:{index}"), cache.make_key(f"{key}:{index - 1}")
    client = _redis_client(CACHE_ALIAS) if settings.CACHES[CACHE_ALIAS]["BACKEND"] == REDIS_CACHE else None
    if client is not None:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(current, "n", 1)
        pipe.hsetnx(current, "f", offset)
        pipe.hmget(current, "f", "l")
        pipe.hset(current, "l", offset)
        pipe.expire(current, ttl)
        pipe.hmget(previous, "n", "f", "l")
        count, set_first, (first, last), _, _, (p_count, p_first, p_last) = pipe.execute()
    else:
        cache.add(f"{current}:n", 0, ttl)
        count = cache.incr(f"{current}:n")
        set_first = cache.add(f"{current}:f", offset, ttl)
        first, last = cache.get(f"{current}:f"), cache.get(f"{current}:l")
        cache.set(f"{current}:l", offset, ttl)
        got = cache.get_many([f"{previous}:{field}" for field in "nfl"])
        p_count, p_first, p_last = (got.get(f"{previous}:{field}") for field in "nfl")
    before = int(count) - 1  # admitted in this window before this request
    p_count = int(p_count or 0)
    p_first, p_last = float(p_first or 0), float(p_last or 0)
    if p_count * _live(offset, p_first, p_last) + before + 1 <= limit:
        return None
    _take_back(client, current, first_was_ours=bool(set_first), last=last, ttl=ttl)
    if before + 1 <= limit:
        # Admitted later in this window, once enough of the previous one has aged out.
        share = (limit - before - 1) / p_count  # of the previous window's requests, what may still count
        return max(0.0, p_last - (p_last - p_first) * share - offset)
    # Not in this window: in the next one, once enough of this one's requests have aged out.
    first, last = float(first or 0), float(last if last is not None else offset)
    share = (limit - 1) / before
    return window - offset + max(0.0, last - (last - first) * share)


def _take_back(client: "redis.Redis | None", current: str, *, first_was_ours: bool, last: Any, ttl: int) -> None:
    """Undo a rejected request's count and offsets: the window is as if it never came. (A
    request admitted meanwhile may lose its `last` to the older one restored here: the
    estimate then ages the window out a little early.)"""
    if client is not None:
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(current, "n", -1)
        if first_was_ours:
            pipe.hdel(current, "f")
        if last is None:
            pipe.hdel(current, "l")
        else:
            pipe.hset(current, "l", last)
        pipe.execute()
        return
    cache = caches[CACHE_ALIAS]
    cache.decr(f"{current}:n")
    if first_was_ours:
        cache.delete(f"{current}:f")
    if last is None:
        cache.delete(f"{current}:l")
    else:
        cache.set(f"{current}:l", last, ttl)


def _live(offset: float, first: float, last: float) -> float:
    """The share of the previous window's requests, spread between its offsets `first` and
    `last`, still younger than one window at `offset` in the current window."""
    if offset >= last:
        return 0.0
    if offset <= first:
        return 1.0
    return (last - offset) / (last - first)


def _redis_client(alias: str) -> "redis.Redis":
    config = settings.CACHES[alias]
    return _client_for(str(config["LOCATION"]), tuple(sorted(config.get("OPTIONS", {}).items())))


@functools.cache
def _client_for(location: str, options: tuple[tuple[str, Any], ...]) -> "redis.Redis":
    """One client (thread-safe, with its connection pool) per cache configuration and
    process, on the server Django's RedisCache writes to (its first), with its options."""
    kwargs: dict[str, Any] = dict(options)
    kwargs.pop("serializer", None)  # the counters are plain integers and floats
    pool_class = _imported(kwargs.pop("pool_class", None)) or redis.ConnectionPool
    kwargs["parser_class"] = _imported(kwargs.pop("parser_class", None)) or redis.connection.DefaultParser
    server = location.replace(";", ",").split(",")[0]
    return redis.Redis(connection_pool=pool_class.from_url(server, **kwargs))


def _imported(value: Any) -> Any:
    return import_string(value) if isinstance(value, str) else value
