"""ASGI entry point: HTTP goes to Django, WebSocket to the broker consumer, lifespan to the node.

No origin validation here: most peers are programs that send no ``Origin``
header; access is controlled with access keys instead.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "turtlemq_site.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from broker.routing import websocket_urlpatterns  # noqa: E402

from .daphne_closes import install as install_daphne_closes  # noqa: E402
from .daphne_shutdown import install as install_daphne_shutdown  # noqa: E402
from .lifespan import lifespan  # noqa: E402

install_daphne_closes()  # close codes 1003 and 1009 under daphne
install_daphne_shutdown()  # SIGTERM hands back this process's work under daphne

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(websocket_urlpatterns),
        "lifespan": lifespan,  # the same graceful shutdown under uvicorn and other servers
    }
)
