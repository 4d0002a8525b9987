"""HTTP routes: the admin and the health check (WebSocket routes are in ``broker.routing``)."""

from django.contrib import admin
from django.urls import path

from broker.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
]
