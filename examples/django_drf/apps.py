from __future__ import annotations

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "examples.django_drf"
    label = "shop"
