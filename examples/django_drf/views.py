from __future__ import annotations

from typing import Any, ClassVar

from rest_framework import mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .models import Order, Payment


class OrderSerializer(serializers.ModelSerializer):
    class Meta:
        model = Order
        fields: ClassVar = ["id", "sku", "quantity", "idempotency_key"]
        read_only_fields: ClassVar = ["id", "idempotency_key"]


class OrderViewSet(mixins.CreateModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """POST /api/orders/ creates an order: once per Idempotency-Key, whatever the retries."""

    serializer_class = OrderSerializer

    def get_queryset(self) -> Any:
        return Order.objects.filter(created_by=self.request.user)

    def perform_create(self, serializer: OrderSerializer) -> None:
        # request.idempotency_key is the client's key (the middleware ran first); keep it for the audit trail.
        serializer.save(created_by=self.request.user, idempotency_key=self.request.idempotency_key)


class PaymentView(APIView):
    """POST /api/orders/<pk>/pay charges the order: once per Idempotency-Key."""

    def post(self, request: Request, pk: int) -> Response:
        order = Order.objects.get(pk=pk, created_by=request.user)
        payment = Payment.objects.create(order=order, amount_cents=int(request.data["amount_cents"]))
        return Response({"payment": payment.pk, "order": order.pk}, status=status.HTTP_201_CREATED)
