from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("orders", views.orders),
    path("atomic-orders", views.atomic_orders),
    path("takeover", views.takeover),
    path("unknown", views.unknown),
    path("mark-unknown", views.mark_unknown),
    path("fail", views.fail),
    path("boom", views.boom),
    path("missing", views.missing),
    path("stream", views.stream),
    path("astream", views.astream),
    path("file", views.download),
    path("key", views.key),
    path("health", views.health),
]
