"""API tokens: obtain one (rate-limited per client address), revoke the one you use."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import RETRY_AFTER, error_responses
from .drf import JSONParser, WriteRateThrottle
from .models import ApiToken
from .tokens import api_token_create, api_token_revoke


class TokenObtainApi(APIView):
    """A username and password for a new API token (each call issues another), with a
    per-client-address limit on attempts (AUTH_TOKEN_RATE). The key is shown only here:
    the database keeps its digest."""

    permission_classes = [AllowAny]
    parser_classes = [JSONParser]
    throttle_classes = [WriteRateThrottle]
    throttle_scope = "auth_token"
    # Per address even for a caller with a token of its own: per user, each account named
    # in the body would be guessed at under the caller's counter (WriteRateThrottle).
    throttle_per_address = True

    @extend_schema(
        operation_id="auth_token_create",
        summary="Exchange a username and password for an API token",
        auth=[],
        request=AuthTokenSerializer,
        parameters=[RETRY_AFTER],
        responses={
            200: inline_serializer(
                "TokenOutput", {"token": serializers.CharField(), "expires_at": serializers.DateTimeField()}
            ),
            **error_responses(400, 413, 415, 429),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = AuthTokenSerializer(data=request.data, context={"request": request})
        serializer.is_valid(raise_exception=True)
        token, key = api_token_create(user=serializer.validated_data["user"])
        return Response({"token": key, "expires_at": token.expires_at})


class TokenRevokeApi(APIView):
    """Revoke the API token this request came with (with a session: every token of yours).
    Every client using it gets 401 from now on.

    A new one comes from POST /api/auth/token/ (staff can also delete any user's token
    in the admin, under "API tokens").
    """

    @extend_schema(
        operation_id="auth_token_revoke",
        summary="Revoke your API token",
        request=None,
        responses={204: OpenApiResponse(description="The token no longer works."), **error_responses(401)},
    )
    def post(self, request: Request) -> Response:
        if isinstance(request.auth, ApiToken):
            api_token_revoke(token=request.auth)
        else:
            api_token_revoke(user=request.user)  # type: ignore[arg-type]  # authenticated: IsAuthenticated
        return Response(status=status.HTTP_204_NO_CONTENT)
