from rest_framework import serializers
from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from ..selectors import product_list


class ProductOutput(serializers.Serializer):
    sku = serializers.CharField()
    name = serializers.CharField()
    price = serializers.DecimalField(max_digits=10, decimal_places=2)
    on_hand = serializers.IntegerField()
    reserved = serializers.IntegerField()
    available = serializers.IntegerField(source="available_units")


class ProductListApi(GenericAPIView):
    def get(self, request: Request) -> Response:
        page = self.paginate_queryset(product_list())
        return self.get_paginated_response(ProductOutput(page, many=True).data)
