"""Topic frame handlers, mixed into ``broker.consumers.BrokerConsumer``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


class TopicFramesMixin:
    """Handlers for the topic frames; filled in by the topics issue."""

    FRAME_HANDLERS: dict[str, Callable[..., Awaitable[None]]] = {}
