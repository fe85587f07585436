from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from common.auth_api import TokenObtainApi, TokenRevokeApi
from inventory.api.views import ProductListApi
from notifications.api.views import NotificationListApi
from orders.api.views import OrderCancelApi, OrderDetailApi, OrderListCreateApi
from payments.api.views import PaymentListApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/auth/token/", TokenObtainApi.as_view(), name="api-token"),
    path("api/auth/token/revoke/", TokenRevokeApi.as_view(), name="api-token-revoke"),
    path("api/orders/", OrderListCreateApi.as_view(), name="order-list"),
    path("api/orders/<uuid:order_id>/", OrderDetailApi.as_view(), name="order-detail"),
    path("api/orders/<uuid:order_id>/cancel/", OrderCancelApi.as_view(), name="order-cancel"),
    path("api/products/", ProductListApi.as_view(), name="product-list"),
    path("api/payments/", PaymentListApi.as_view(), name="payment-list"),
    path("api/notifications/", NotificationListApi.as_view(), name="notification-list"),
]
urlpatterns += [
    # The OpenAPI schema of every endpoint above, and Swagger UI on it (assets served
    # locally from drf-spectacular-sidecar).
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]

# JSON instead of Django's HTML error pages under /api/ (and never a traceback).
handler400 = "common.api.bad_request"
handler403 = "common.api.permission_denied"
handler404 = "common.api.page_not_found"
handler500 = "common.api.server_error"
