"""API tokens: obtain one (rate-limited per client address), revoke your own."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import RETRY_AFTER, error_responses
from .drf import JSONParser, WriteRateThrottle


class TokenObtainApi(ObtainAuthToken):
    """DRF's token view, with a per-client-address limit on attempts (AUTH_TOKEN_RATE)."""

    permission_classes = [AllowAny]
    parser_classes = [JSONParser]
    throttle_classes = [WriteRateThrottle]
    throttle_scope = "auth_token"

    @extend_schema(
        operation_id="auth_token_create",
        summary="Exchange a username and password for an API token",
        auth=[],
        parameters=[RETRY_AFTER],
        responses={
            200: inline_serializer("TokenOutput", {"token": serializers.CharField()}),
            **error_responses(400, 413, 415, 429),
        },
    )
    def post(self, request: Request, *args, **kwargs) -> Response:
        return super().post(request, *args, **kwargs)


class TokenRevokeApi(APIView):
    """Delete the caller's API token: every client using it gets 401 from now on.

    A new one comes from POST /api/auth/token/ (staff can also delete any user's token
    in the admin, under "Auth Token > Tokens").
    """

    @extend_schema(
        operation_id="auth_token_revoke",
        summary="Revoke your API token",
        request=None,
        responses={204: OpenApiResponse(description="The token no longer works."), **error_responses(401)},
    )
    def post(self, request: Request) -> Response:
        Token.objects.filter(user=request.user).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)
