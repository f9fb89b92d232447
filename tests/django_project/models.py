"""The business's ledger: one row per order the views carry out (what "exactly once" is counted in)."""

from __future__ import annotations

from django.db import models


class Order(models.Model):
    """One order a view carried out."""

    sku = models.CharField(max_length=200)
    key = models.CharField(max_length=255, null=True)
    user = models.CharField(max_length=200, default="")
    pid = models.IntegerField(default=0)

    class Meta:
        app_label = "ledger"
