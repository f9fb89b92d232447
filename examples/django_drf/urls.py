from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from .views import OrderViewSet, PaymentView

router = SimpleRouter()
router.register("api/orders", OrderViewSet, basename="order")

urlpatterns = [*router.urls, path("api/orders/<int:pk>/pay", PaymentView.as_view())]
