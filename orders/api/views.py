import json
import re
import uuid
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied, ValidationError
from rest_framework.generics import GenericAPIView
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common.api import RETRY_AFTER, error_responses, visible_user_id
from common.drf import WriteRateThrottle
from common.tokens import ApiTokenAuthentication
from saga.models import SagaAuditEntry, SagaInstance

from .. import selectors, services
from ..exceptions import IdempotencyConflict, OrderNotCancellable, OrderTotalTooLarge, UnknownSkus
from ..models import Order
from .render import order_body
from .serializers import OrderCreateInput, OrderOutput, order_input_as_given

IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-:.]{1,255}$")
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    location=OpenApiParameter.HEADER,
    pattern=IDEMPOTENCY_KEY_PATTERN.pattern,
    description="Makes a retried request safe: the same key with the same body answers with the same "
    "order (Idempotent-Replayed: true) and starts nothing; with another body, 422. 1 to 255 of "
    "A-Z a-z 0-9 _ - : . (a UUID works).",
)
ORDER_ID = OpenApiParameter("order_id", type=uuid.UUID, location=OpenApiParameter.PATH)
# Reading other customers' orders, and stopping them: the admin's own permissions
# (docs/SECURITY.md). Staff without them are customers here.
VIEW_ORDERS = "orders.view_order"
COMPENSATE_SAGA = "saga.compensate_saga"


def render_orders(orders: list[Order], sagas: Iterable[SagaInstance] | None = None) -> Any:
    """The orders' API bodies, in order (a list)."""
    if sagas is None:
        sagas = SagaInstance.objects.filter(order_id__in=[o.id for o in orders]).prefetch_related("steps")
    by_order = {s.order_id: s for s in sagas}
    return [order_body(order, by_order.get(order.id)) for order in orders]


def render_order(order: Order) -> dict:
    return render_orders([order])[0]


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise ValidationError(
            {"Idempotency-Key": ["Use 1 to 255 characters from letters, digits and _ - : . (a UUID works)."]}
        )
    return key


def _get_visible_order(request: Request, order_id: uuid.UUID) -> Order:
    order = selectors.order_get(order_id=order_id, user_id=visible_user_id(request, permission=VIEW_ORDERS))
    if order is None:
        # Someone else's order is indistinguishable from a missing one.
        raise Http404
    return order


# The one representation the hot path answers in (its Accept must allow it).
_JSON = JSONRenderer()
_JSON_ACCEPTS = frozenset(("", "*/*", "application/json"))


class OrderListCreateApi(GenericAPIView):
    # Order creation is rate-limited per user (ORDER_CREATE_RATE); listing is not.
    throttle_classes = [WriteRateThrottle]
    throttle_scope = "order_create"
    serializer_class = OrderOutput
    # Whether a plain order is placed without REST framework's request handling (below).
    hot_path = True

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        if self.hot_path and request.method == "POST" and (response := self._post_plain(request)) is not None:
            return response
        return super().dispatch(request, *args, **kwargs)

    def _post_plain(self, request: HttpRequest) -> Response | None:
        """Place an order written the plain way (JSON with a token, in the form the
        serializer would give back, no content negotiation) as `post` would, without REST
        framework's request, parsers, negotiation and serializer: about a fifth of the web's
        CPU for each order (BENCHMARKS.md). None for any other request, and for one that
        fails authentication or the rate limit, before anything is counted or written:
        REST framework then handles it whole, and words its errors.

        The same token check and rate limit, in the same order; the same `_place` and its
        errors, turned into responses by REST framework's own handler; the same JSON and
        headers (tests/test_api.py compares the two paths' answers).
        """
        charset = (request.content_params or {}).get("charset", "utf-8")
        if request.content_type != "application/json" or charset.lower() != "utf-8":
            return None
        if request.headers.get("Accept", "") not in _JSON_ACCEPTS:
            return None
        try:
            length = int(request.META.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        if not 0 < length <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            return None
        key = request.headers.get("Idempotency-Key")
        if key is not None and not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
            return None
        try:
            # As REST framework's JSON parser reads it: UTF-8, strictly.
            data = order_input_as_given(json.loads(request.body.decode("utf-8")))
        except (ValueError, RecursionError):
            return None
        if data is None:
            return None
        try:
            authenticated = ApiTokenAuthentication().authenticate(request)  # type: ignore[arg-type]
        except AuthenticationFailed:
            return None
        if authenticated is None:
            return None  # not a token: the session, or nobody
        user = request.user = authenticated[0]  # as REST framework's request sets it
        if not WriteRateThrottle().allow_request(request, self):  # type: ignore[arg-type]
            return None  # not counted: REST framework's check says so again, with Retry-After
        self.headers = self.default_response_headers  # as REST framework's dispatch sets them
        try:
            response = self._place(user.pk, data, key)
        except Exception as error:
            # Counted and not placed: answered as `post` would have been, by REST framework.
            self.request = self.initialize_request(request)
            return self.finalize_response(self.request, self.handle_exception(error))
        # Content negotiation, done above (Accept): REST framework's finalising does the rest.
        request.accepted_renderer, request.accepted_media_type = _JSON, _JSON.media_type  # type: ignore[attr-defined]
        return self.finalize_response(request, response)  # type: ignore[arg-type]  # reads only the renderer

    @extend_schema(
        operation_id="orders_list",
        summary="Your orders, newest first (with orders.view_order: everyone's)",
        responses={200: OrderOutput(many=True), **error_responses(400, 401)},
    )
    def get(self, request: Request) -> Response:
        user_id = visible_user_id(request, permission=VIEW_ORDERS)
        orders = selectors.order_list(user_id=user_id).prefetch_related("lines")
        page = self.paginate_queryset(orders)
        return self.get_paginated_response(render_orders(list(page or [])))

    @extend_schema(
        operation_id="orders_create",
        summary="Place an order: its saga starts, the answer does not wait for it",
        request=OrderCreateInput,
        examples=[
            OpenApiExample(
                "Two mugs",
                value={
                    "email": "you@example.com",
                    "items": [{"sku": "MUG-LOGO", "quantity": 2}],
                    "payment_token": "tok_visa",
                },
                request_only=True,
            )
        ],
        parameters=[
            IDEMPOTENCY_KEY,
            OpenApiParameter(
                "Location", location=OpenApiParameter.HEADER, response=[202], required=True, description="The order."
            ),
            OpenApiParameter(
                "Idempotent-Replayed",
                location=OpenApiParameter.HEADER,
                response=[202],
                enum=["true"],
                description="Present when the Idempotency-Key was seen before: this is that order.",
            ),
            RETRY_AFTER,
        ],
        responses={
            202: OpenApiResponse(OrderOutput, description="The order, pending, with its saga."),
            **error_responses(400, 401, 413, 415, 422, 429),
        },
    )
    def post(self, request: Request) -> Response:
        key = _idempotency_key(request)
        serializer = OrderCreateInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        return self._place(request.user.id, serializer.validated_data, key)  # type: ignore[arg-type]  # authenticated

    @staticmethod
    def _place(user_id: int, data: Any, key: str | None) -> Response:
        """Place the order `data` (validated) for `user_id`: the 202 with the order, or the
        API's error (raised, or a 422 for a reused Idempotency-Key)."""
        try:
            order, created = services.order_place(
                user_id=user_id,
                email=data["email"],
                phone=data["phone"],
                items=[services.OrderItem(sku=i["sku"], quantity=i["quantity"]) for i in data["items"]],
                payment_token=data["payment_token"],
                idempotency_key=key,
                fingerprint=services.request_fingerprint(data),
            )
        except UnknownSkus as unknown:
            # Keyed by the line's index, as REST framework words the items' own field
            # errors (a ListField's): one shape for every error of a line.
            raise ValidationError(
                {
                    "items": {
                        str(index): {"sku": [f"Unknown SKU {item['sku']!r}."]}
                        for index, item in enumerate(data["items"])
                        if item["sku"] in unknown.skus
                    }
                }
            ) from None
        except OrderTotalTooLarge as large:
            raise ValidationError(
                {"items": [f"These items come to {large.total}, more than an order may come to ({large.most})."]}
            ) from None
        except IdempotencyConflict as conflict:
            return Response({"detail": str(conflict)}, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
        headers = {"Location": f"/api/orders/{order.id}/"}
        if created:
            # As written by order_place, with its lines and saga: nothing to read back.
            body = render_orders([order], sagas=[order.placed_saga])[0]  # type: ignore[attr-defined]
        else:
            headers["Idempotent-Replayed"] = "true"
            body = render_order(selectors.order_get(order_id=order.id, user_id=None))  # type: ignore[arg-type]
        return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)


class OrderDetailApi(APIView):
    @extend_schema(
        operation_id="orders_retrieve",
        summary="An order, its items and its saga's steps",
        parameters=[ORDER_ID],
        responses={200: OrderOutput, **error_responses(401, 404)},
    )
    def get(self, request: Request, order_id: uuid.UUID) -> Response:
        return Response(render_order(_get_visible_order(request, order_id)))


class OrderCancelApi(APIView):
    @extend_schema(
        operation_id="orders_cancel",
        summary="Cancel an order while its saga runs: whatever was done is compensated",
        description="Your own order ends `cancelled`. Someone else's order (you need orders.view_order to "
        "see it and saga.compensate_saga to stop it) is stopped as the admin's *compensate* does: it ends "
        "`failed`, the customer is told, and the audit log records who did it.",
        parameters=[ORDER_ID],
        request=None,
        responses={
            202: OpenApiResponse(OrderOutput, description="Cancelling: the order ends `cancelled` (or `failed`)."),
            **error_responses(401, 403, 404, 409),
        },
    )
    def post(self, request: Request, order_id: uuid.UUID) -> Response:
        order = _get_visible_order(request, order_id)
        if order.user_id == request.user.id:
            try:
                services.order_cancel(order_id=order.id)
            except OrderNotCancellable as refusal:
                return self._refused(str(refusal))
        else:
            # Someone else's order: an operator's act, with the admin's permission and audit.
            if not request.user.has_perm(COMPENSATE_SAGA):
                raise PermissionDenied("Stopping someone else's order needs the permission saga.compensate_saga.")
            entry = services.order_stop_by_operator(order_id=order.id, user=request.user)
            if entry.outcome != SagaAuditEntry.Outcome.DONE:
                return self._refused(entry.detail)
        return Response(render_order(_get_visible_order(request, order_id)), status=status.HTTP_202_ACCEPTED)

    @staticmethod
    def _refused(why: str) -> Response:
        return Response({"detail": f"This order cannot be cancelled: {why}."}, status=status.HTTP_409_CONFLICT)
