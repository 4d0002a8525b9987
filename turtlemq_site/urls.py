"""HTTP routes: the admin, the health check and topics (WebSocket routes are in ``broker.routing``)."""

from django.contrib import admin
from django.urls import include, path

from broker.views import healthz

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("", include("subscriptions.urls")),
]
