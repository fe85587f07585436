"""The REST framework classes settings.py names (parser, exception handler, pagination,
throttle): docs/SECURITY.md.

Kept apart from common.api on purpose: DRF resolves these dotted paths when it first
builds `APIView`, so this module must not import `rest_framework.views` (or anything
that defines a view) at import time, or the first process to import it before DRF's
views (celery beat does) would find it half-initialised.
"""

import logging
import re
from collections.abc import Mapping
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import parsers, status
from rest_framework.exceptions import APIException, ParseError, ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from .ratelimit import rate_limit_hit

logger = logging.getLogger(__name__)


# --- Request bodies -------------------------------------------------------------------


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "request_too_large"


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, for which JSON nested too deeply for Python's parser is a 400
    like any other malformed JSON, not a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None


def exception_handler(exc: Exception, context: dict) -> Response | None:
    """DRF's handler, plus a 413 for a body over DATA_UPLOAD_MAX_MEMORY_SIZE (Django raises
    RequestDataTooBig when DRF reads the body, which DRF would leave to a 400 page)."""
    if isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge(f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")
    from rest_framework.views import exception_handler as drf_exception_handler

    return drf_exception_handler(exc, context)


# --- Pagination -----------------------------------------------------------------------

_NON_NEGATIVE_INT = re.compile(r"[0-9]{1,18}")
MAX_QUERY_INT = 10**18 - 1  # fits PostgreSQL's bigint OFFSET


class Pagination(LimitOffsetPagination):
    """`?limit=&offset=`: decimal digits only (anything else is a 400, not silently
    ignored); `limit` from 1, capped at API_MAX_PAGE_SIZE."""

    max_limit = settings.API_MAX_PAGE_SIZE
    # DRF's own default (PAGE_SIZE), which settings always set: never None here.
    default_limit: int = settings.REST_FRAMEWORK["PAGE_SIZE"]

    def _parse(self, request: Request, name: str, minimum: int) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        if not _NON_NEGATIVE_INT.fullmatch(raw) or int(raw) < minimum:
            raise ValidationError({name: [f"Enter a whole number of at least {minimum}."]})
        return int(raw)

    def get_limit(self, request: Request) -> int:
        limit = self._parse(request, self.limit_query_param, 1)
        return self.default_limit if limit is None else min(limit, self.max_limit)

    def get_offset(self, request: Request) -> int:
        return self._parse(request, self.offset_query_param, 0) or 0

    def get_schema_operation_parameters(self, view: Any) -> list[dict]:
        return [
            {
                "name": self.limit_query_param,
                "required": False,
                "in": "query",
                "description": f"Number of results per page (default {self.default_limit}, at most {self.max_limit}).",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_QUERY_INT},
            },
            {
                "name": self.offset_query_param,
                "required": False,
                "in": "query",
                "description": "How many results to skip.",
                "schema": {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_INT},
            },
        ]


# --- Rate limits ----------------------------------------------------------------------


class WriteRateThrottle(ScopedRateThrottle):
    """The view's `throttle_scope` rate (REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]) for
    POST requests only, per user (per client address when anonymous, as DRF tells them
    apart: NUM_PROXIES), counted in the shared cache by a sliding-window counter
    (common.ratelimit: O(1), one round trip, where DRF's own keeps and rewrites a list of
    every request in the window). A cache outage lets requests through: the limit is a
    guard, not a dependency of taking orders."""

    def allow_request(self, request: Request, view: Any) -> bool:
        if request.method in SAFE_METHODS:
            return True
        self.scope = getattr(view, self.scope_attr, None)
        if not self.scope:
            return True
        try:
            self.rate = self.get_rate()
            self.num_requests, self.duration = self.parse_rate(self.rate)
            if self.num_requests is None or self.duration is None:  # a rate of None: no limit
                return True
            self.key = self.get_cache_key(request, view)
            if self.key is None:
                return True
            self._wait = rate_limit_hit(self.key, limit=self.num_requests, window=self.duration, now=self.timer())
        except redis.RedisError as error:
            # A cache outage fails every request for its duration: one line each, not a
            # traceback (each was about 50 lines of the web's log).
            logger.warning("rate limit not applied: the cache is unavailable (%s: %s)", type(error).__name__, error)
            return True
        except Exception:
            logger.warning("rate limit not applied: the cache is unavailable", exc_info=True)
            return True
        return self._wait is None

    def get_cache_key(self, request: Request, view: Any) -> str | None:
        """Per user, as REST framework counts; per client address for a view that says
        `throttle_per_address` (the token endpoint, where the body names the account)."""
        if getattr(view, "throttle_per_address", False):
            return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
        return super().get_cache_key(request, view)

    def wait(self) -> float | None:
        """Seconds until a request would be admitted (Retry-After)."""
        return self._wait
