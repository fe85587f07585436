"""What every service's API shares: the `?order=` filter, JSON errors under /api/, and the
error bodies the OpenAPI schema documents (docs/SECURITY.md). The DRF classes settings.py
names are in common.drf."""

import uuid
from functools import cache
from typing import Protocol

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.utils.module_loading import import_string
from django.views import defaults
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request

ORDER_FILTER = OpenApiParameter(
    "order",
    type=uuid.UUID,
    location=OpenApiParameter.QUERY,
    description="The order whose records to list. Required unless you hold the records' view permission "
    "(e.g. payments.view_payment): it must be one of your orders (another's is 404); with the "
    "permission, any order, or none to list everything.",
)


class OrderVisible(Protocol):
    def __call__(self, *, order_id: uuid.UUID, user_id: int | None) -> bool: ...


@cache
def _order_visible() -> OrderVisible:
    # The orders service's answer, found through settings.ORDER_VISIBLE: `common` imports
    # no service, so that a participant's API can use it without depending on orders.
    return import_string(settings.ORDER_VISIBLE)


def visible_user_id(request: Request, *, permission: str) -> int | None:
    """Whose records the caller may read: everyone's with the model's view `permission`
    (e.g. "payments.view_payment"), otherwise only their own (the user's id).

    Being staff is not enough: `is_staff` opens the admin's door, and the admin checks
    each model's permissions too. A staff user without them is a customer here.
    """
    return None if request.user.has_perm(permission) else request.user.id


def order_filter(request: Request, *, permission: str) -> uuid.UUID | None:
    """The `?order=<id>` filter, checked against what the caller may see.

    Without the records' view `permission` the caller must name one of their own orders
    (another's is 404, like the order itself); with it, any order, or none to list
    everything.
    """
    user_id = visible_user_id(request, permission=permission)
    raw = request.query_params.get("order")
    if raw is None:
        if user_id is None:
            return None
        raise ValidationError({"order": ["This query parameter is required: ?order=<order id>."]})
    try:
        order_id = uuid.UUID(raw)
    except ValueError:
        raise ValidationError({"order": [f"{raw!r} is not a valid order id."]}) from None
    if not _order_visible()(order_id=order_id, user_id=user_id):
        raise Http404
    return order_id


# --- Errors outside DRF's views (URL not found, server error): JSON under /api/ -------


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if isinstance(exception, RequestDataTooBig) and _is_api(request):
        return JsonResponse({"detail": "The request body is too large."}, status=413)
    if _is_api(request):
        return JsonResponse({"detail": "Bad request."}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "You do not have permission to perform this action."}, status=403)
    return defaults.permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    # Never the exception or a traceback: those are in the server log.
    if _is_api(request):
        return JsonResponse({"detail": "Internal server error."}, status=500)
    return defaults.server_error(request)


# --- OpenAPI: the error bodies every endpoint may answer with -------------------------


class ErrorOutput(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong, for a person to read.")


VALIDATION_ERROR = OpenApiResponse(
    response={
        "type": "object",
        "description": "One entry per invalid field (or header / query parameter): a list of messages; "
        "for a list of objects, the failing elements' errors (such objects) keyed by index "
        '("0", "1", ...), or a list of messages about the list as a whole.',
        "additionalProperties": True,
    },
    description="Invalid input: a message per field.",
)


def error_responses(*codes: int) -> dict[int, OpenApiResponse]:
    """The documented error answers of an operation, by status code (429's Retry-After
    header is RETRY_AFTER, listed with the operation's parameters)."""
    descriptions = {
        400: "Invalid input: a message per field.",
        401: "No valid token (or session): authenticate first.",
        403: "You may see this object but not do this to it.",
        404: "No such object, or not yours.",
        409: "The object's state does not allow this.",
        413: "The request body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE.",
        415: "The body is not JSON (Content-Type: application/json).",
        422: "The Idempotency-Key was already used with a different request.",
        429: "Too many requests: retry after the number of seconds in Retry-After.",
    }
    responses = {}
    for code in codes:
        if code == 400:
            responses[code] = VALIDATION_ERROR
        else:
            responses[code] = OpenApiResponse(ErrorOutput, description=descriptions[code])
    return responses


RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    type=int,
    location=OpenApiParameter.HEADER,
    response=[429],
    required=True,
    description="Seconds to wait before the next request.",
)
