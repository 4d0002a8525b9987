"""WebSocket routes: the protocol is served at ``/`` (as the original TurtleMQ) and ``/ws/``."""

from django.urls import path

from .consumers import BrokerConsumer

websocket_urlpatterns = [
    path("", BrokerConsumer.as_asgi()),
    path("ws/", BrokerConsumer.as_asgi()),
]
