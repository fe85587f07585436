from django.contrib import admin
from django.urls import path
from rest_framework.authtoken.views import obtain_auth_token

from inventory.api.views import ProductListApi
from notifications.api.views import NotificationListApi
from orders.api.views import OrderCancelApi, OrderDetailApi, OrderListCreateApi
from payments.api.views import PaymentListApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/auth/token/", obtain_auth_token, name="api-token"),
    path("api/orders/", OrderListCreateApi.as_view(), name="order-list"),
    path("api/orders/<uuid:order_id>/", OrderDetailApi.as_view(), name="order-detail"),
    path("api/orders/<uuid:order_id>/cancel/", OrderCancelApi.as_view(), name="order-cancel"),
    path("api/products/", ProductListApi.as_view(), name="product-list"),
    path("api/payments/", PaymentListApi.as_view(), name="payment-list"),
    path("api/notifications/", NotificationListApi.as_view(), name="notification-list"),
]
