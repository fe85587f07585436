from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from common.api import error_responses

from ..selectors import product_list


class ProductOutput(serializers.Serializer):
    sku = serializers.CharField()
    name = serializers.CharField()
    price = serializers.DecimalField(max_digits=10, decimal_places=2)
    on_hand = serializers.IntegerField()
    reserved = serializers.IntegerField()
    available = serializers.IntegerField(source="available_units")


class ProductListApi(GenericAPIView):
    serializer_class = ProductOutput

    @extend_schema(
        operation_id="products_list",
        summary="The catalogue, with stock figures",
        responses={200: ProductOutput(many=True), **error_responses(400, 401)},
    )
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(product_list())
        return self.get_paginated_response(ProductOutput(page, many=True).data)
