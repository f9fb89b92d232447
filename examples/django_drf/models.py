from __future__ import annotations

from django.conf import settings
from django.db import models


class Order(models.Model):
    sku = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField()
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    idempotency_key = models.CharField(max_length=255, null=True)

    class Meta:
        app_label = "shop"


class Payment(models.Model):
    order = models.ForeignKey(Order, on_delete=models.PROTECT)
    amount_cents = models.PositiveIntegerField()

    class Meta:
        app_label = "shop"
