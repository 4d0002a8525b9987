"""The WebSocket consumer: decode a frame, call the domain, send frames.

One consumer class serves every peer at ``/`` and ``/ws/``: clients and
workers (``broker.dispatch``) and topic subscribers and publishers
(``subscriptions``). It keeps only what belongs to its own connection (its
role and row id); every decision about tasks is made in the domain layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from subscriptions.consumers import TopicFramesMixin
from subscriptions.protocol import TOPIC_PARSERS

from . import dispatch, events, protocol
from .models import Connection
from .node import NodeStopped, node
from .protocol import ErrorCode, ProtocolError

logger = logging.getLogger("turtlemq.broker")

PARSERS: dict[str, protocol.Parser] = {**protocol.TASK_PARSERS, **TOPIC_PARSERS}

# WebSocket close codes (RFC 6455).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_MESSAGE_TOO_BIG = 1009

register_client = database_sync_to_async(dispatch.register_client)
register_worker = database_sync_to_async(dispatch.register_worker)
release_connection = database_sync_to_async(dispatch.release_connection)
submit_task = database_sync_to_async(dispatch.submit_task)
complete_task = database_sync_to_async(dispatch.complete_task)
fail_task = database_sync_to_async(dispatch.fail_task)
touch_task = database_sync_to_async(dispatch.touch_task)
mark_delivered = database_sync_to_async(dispatch.mark_delivered)
broker_status = database_sync_to_async(dispatch.broker_status)


class BrokerConsumer(TopicFramesMixin, AsyncWebsocketConsumer):
    """A peer of the broker: client, worker, subscriber or publisher."""

    role: str | None = None
    connection_id: int | None = None
    client_id: str | None = None  # REGISTER_CLIENT.clientId

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections (a thread hop) before
        # every handler. Every database call here goes through
        # database_sync_to_async, which does that itself, so skip the hop.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self._delivered: list[int] = []
        self._delivered_flush: asyncio.Task[None] | None = None
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.connection_id is not None:
            effects = await release_connection(self.connection_id)
            await events.ring(effects)
        await self._flush_delivered()
        await super().disconnect(code)

    # --- frames from the peer ---------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.close(code=CLOSE_UNSUPPORTED_DATA)
            return
        limit = settings.TURTLEMQ_MAX_FRAME_BYTES
        if len(text_data) > limit // 4 and len(text_data.encode()) > limit:
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        obj: Mapping[str, Any] = {}
        try:
            obj = protocol.decode(text_data)
            frame = protocol.parse(obj, PARSERS)
            await self.FRAME_HANDLERS[obj["type"]](self, text_data, obj, frame)
        except dispatch.UnknownTask as exc:
            await self.send_error(exc, obj)
            # Rule 4: remind the worker of what it really holds.
            for task_id, data in exc.held:
                await self.send_frame(protocol.request_task_frame(task_id, data))
        except ProtocolError as exc:
            await self.send_error(exc, obj)
        except NodeStopped:
            await self.close(code=CLOSE_GOING_AWAY)  # registering while this process shuts down

    async def on_register_client(self, text: str, obj: Mapping[str, Any], frame: protocol.RegisterClient) -> None:
        self._require_unregistered()
        registration = await register_client(
            await node.ensure_started(), self.channel_name, frame.client_id, self._remote_addr()
        )
        self._registered(Connection.Role.CLIENT, registration.connection_id)
        self.client_id = frame.client_id
        await self.send(text_data=text)  # the original protocol echoes the frame
        await self.ring(registration.effects)

    async def on_register_worker(self, text: str, obj: Mapping[str, Any], frame: protocol.RegisterWorker) -> None:
        self._require_unregistered()
        registration = await register_worker(
            await node.ensure_started(), self.channel_name, frame.concurrency, self._remote_addr()
        )
        self._registered(Connection.Role.WORKER, registration.connection_id)
        await self.send(text_data=text)
        await self.ring(registration.effects)

    async def on_request_task(self, text: str, obj: Mapping[str, Any], frame: protocol.RequestTask) -> None:
        self._require_role(Connection.Role.CLIENT)
        effects = await submit_task(
            self.channel_name, self.client_id, frame.message_id, frame.data, frame.timeout, frame.max_attempts
        )
        await self.ring(effects)

    async def on_response_task(self, text: str, obj: Mapping[str, Any], frame: protocol.ResponseTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await self.ring(await complete_task(self.connection_id, frame.task_id, frame.data))

    async def on_fail_task(self, text: str, obj: Mapping[str, Any], frame: protocol.FailTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await self.ring(await fail_task(self.connection_id, frame.task_id, frame.error))

    async def on_touch_task(self, text: str, obj: Mapping[str, Any], frame: protocol.TouchTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await touch_task(self.connection_id, frame.task_id)

    async def on_status(self, text: str, obj: Mapping[str, Any], frame: protocol.Status) -> None:
        await self.send_frame(protocol.status_frame(await broker_status()))

    # --- channel-layer events --------------------------------------------------------

    async def task_assign(self, event: events.TaskAssignEvent) -> None:
        """A task for this worker: send it as REQUEST_TASK."""
        await self.send_frame(protocol.request_task_frame(event["task_id"], event["data"]))

    async def node_going_away(self, event: events.NodeGoingAwayEvent) -> None:
        """This broker process stopped serving the connection (shutdown, or declared dead): the peer reconnects."""
        await self.close(code=CLOSE_GOING_AWAY)

    async def task_outcome(self, event: events.TaskOutcomeEvent) -> None:
        """The outcome of one of this client's tasks: send it, then record the delivery."""
        if event["ok"]:
            await self.send_frame(protocol.response_task_frame(event["message_id"], event["data"]))
        else:
            await self.send_frame(protocol.task_failed_frame(event["message_id"], event["data"]))
        self._delivered.append(event["task_id"])
        if self._delivered_flush is None or self._delivered_flush.done():
            self._delivered_flush = asyncio.ensure_future(self._flush_delivered())

    # --- helpers ---------------------------------------------------------------------

    async def send_frame(self, frame: Mapping[str, Any]) -> None:
        await self.send(text_data=protocol.encode(frame))

    async def send_error(self, exc: ProtocolError, obj: Mapping[str, Any]) -> None:
        ref = exc.ref or (protocol.ref_of(obj) if obj else {})
        await self.send_frame(protocol.error_frame(exc.code, exc.message, ref))

    async def ring(self, effects: dispatch.Effects) -> None:
        """Announce effects; those meant for this very connection skip the channel layer."""
        await events.ring(effects, self.channel_layer, self._deliver_here)

    async def _deliver_here(self, channel: str, event: dict[str, Any]) -> bool:
        if channel != self.channel_name:
            return False
        await self.dispatch(event)
        return True

    async def _flush_delivered(self) -> None:
        # Outcomes sent while a flush was running are marked by the next
        # batch, so a burst of results costs a few updates, not one each.
        while self._delivered:
            batch, self._delivered = self._delivered, []
            try:
                await mark_delivered(batch)
            except Exception:
                logger.exception("could not record the delivery of tasks %s", batch)

    def _require_unregistered(self) -> None:
        if self.role is not None:
            raise ProtocolError(ErrorCode.ALREADY_REGISTERED, f"this connection is already registered as a {self.role}")

    def _require_role(self, role: str) -> None:
        if self.role is None:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, f"register as a {role} first (REGISTER_{role.upper()})")
        if self.role != role:
            raise ProtocolError(ErrorCode.WRONG_ROLE, f"this connection is registered as a {self.role}, not a {role}")

    def _registered(self, role: str, connection_id: int) -> None:
        self.role = role
        self.connection_id = connection_id

    def _remote_addr(self) -> str:
        client = self.scope.get("client")
        return f"{client[0]}:{client[1]}" if client else ""

    FRAME_HANDLERS: dict[str, Callable[..., Awaitable[None]]] = {
        "REGISTER_CLIENT": on_register_client,
        "REGISTER_WORKER": on_register_worker,
        "REQUEST_TASK": on_request_task,
        "RESPONSE_TASK": on_response_task,
        "FAIL_TASK": on_fail_task,
        "TOUCH_TASK": on_touch_task,
        "STATUS": on_status,
        **TopicFramesMixin.FRAME_HANDLERS,
    }
