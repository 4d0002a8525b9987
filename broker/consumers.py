"""The WebSocket consumer: decode a frame, call the domain, send frames.

One consumer class serves every peer at ``/`` and ``/ws/``: clients and
workers (``broker.dispatch``) and topic subscribers and publishers
(``subscriptions``). It keeps only what belongs to its own connection (its
role and row id); every decision about tasks is made in the domain layer.

Access control and limits sit in front of the handlers, in ``receive``: the
frame rate (``broker.ratelimit``), then the access key (``broker.access``:
presented at the handshake or in the first frame), then what the key grants
for this frame. The in-flight limit of a client is the domain's
(``dispatch.submit_task``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from subscriptions.consumers import TopicFramesMixin
from subscriptions.protocol import TOPIC_PARSERS

from . import access, commits, dispatch, events, local, protocol
from .models import Connection
from .node import NodeStopped, node
from .protocol import ErrorCode, ProtocolError
from .ratelimit import TokenBucket

logger = logging.getLogger("turtlemq.broker")

# Handler names of the messages every connection gets, known without get_handler_name's checks.
_HANDLER_NAMES = {
    "websocket.receive": "websocket_receive",
    "task.assign": "task_assign",
    "task.outcome": "task_outcome",
}

PARSERS: dict[str, protocol.Parser] = {**protocol.TASK_PARSERS, **TOPIC_PARSERS}

# WebSocket close codes (RFC 6455).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_UNAUTHORIZED = 4401  # an application code: missing, wrong or revoked access key

register_client = database_sync_to_async(dispatch.register_client)
register_worker = database_sync_to_async(dispatch.register_worker)
broker_status = database_sync_to_async(dispatch.broker_status)
authenticate = database_sync_to_async(access.authenticate)
current_grant = database_sync_to_async(access.current_grant)


# How many task operations of one connection may wait for their commit at once (see _enqueue).
PIPELINE_DEPTH = 256

NO_KEY_MESSAGE = (
    "access control is on: present an access key as ?token=KEY, as an 'Authorization: Bearer KEY' header "
    "or as the 'token' field of the first frame"
)
RATE_LIMITED_MESSAGE = "too many frames per second on this connection; this frame was not processed"


def _readable(text: str) -> dict[str, Any]:
    """The ``ref`` of a frame that is refused before it is parsed."""
    try:
        return protocol.ref_of(protocol.decode(text))
    except ProtocolError:
        return {}


class BrokerConsumer(TopicFramesMixin, AsyncWebsocketConsumer):
    """A peer of the broker: client, worker, subscriber or publisher."""

    role: str | None = None
    connection_id: int | None = None
    client_id: str | None = None  # REGISTER_CLIENT.clientId
    # What this connection may do; None until it presents a valid key (auth on).
    grant: access.Grant | None = access.FULL_ACCESS
    refused = False  # closed for want of a valid key: later frames are ignored

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        """Serve the connection: frames from the socket here, channel-layer events in a task beside it.

        Channels' own loop starts a task and waits on two for every message;
        this one reads the socket in the connection's task and the layer in
        one task for the connection's whole life. Handlers may therefore run
        side by side, as they already do for in-process deliveries
        (``broker.local``); those that must not (the topic frames) hold a lock.
        """
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = send
        layer_events = asyncio.ensure_future(self._read_layer())
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass
        finally:
            layer_events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await layer_events

    async def _read_layer(self) -> None:
        try:
            while True:
                await self.dispatch(await self.channel_layer.receive(self.channel_name))
        except StopConsumer:
            pass
        except Exception:
            # As an error in Channels' own loop would: the connection ends.
            logger.exception("channel-layer events of %s failed; closing the connection", self.channel_name)
            await self.close(code=CLOSE_INTERNAL_ERROR)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections (a thread hop) before
        # every handler. Every database call here goes through
        # database_sync_to_async, which does that itself, so skip the hop.
        name = _HANDLER_NAMES.get(message["type"]) or get_handler_name(message)
        handler = getattr(self, name, None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        await handler(message)

    async def connect(self) -> None:
        self._auth_deadline: asyncio.Task[None] | None = None
        self._key_group: str | None = None  # the group of the key's connections (see access_changed)
        self._unanswered = 0  # tasks this connection submitted whose outcome it has not been sent
        self._closing = False  # the broker closed the connection (see close)
        self._pipelined = 0  # its task operations waiting for their commit
        self._pipeline_moved: asyncio.Future[None] | None = None  # set when one of them is done (see _enqueue)
        self._group_commit = commits.group_commit()  # this process's; looked up once per connection
        self._reports: set[asyncio.Future[None]] = set()  # ERROR frames of those refused, being sent
        self._max_frame_bytes = settings.TURTLEMQ_MAX_FRAME_BYTES
        if not access.origin_allowed(self.scope):
            await self.close()  # before accepting: the server refuses the handshake (HTTP 403)
            return
        self._frames = TokenBucket(settings.TURTLEMQ_MAX_FRAMES_PER_SECOND, settings.TURTLEMQ_FRAME_BURST)
        await self.accept()
        local.register(self.channel_name, self)
        if settings.TURTLEMQ_AUTH:
            self.grant = None
            token = access.token_from_scope(self.scope)
            if token is not None:
                try:
                    await self._authenticate(token)
                except access.Unauthenticated as exc:
                    await self._refuse(exc, {})
            else:
                # Otherwise the first frame must carry the key, and soon.
                self._auth_deadline = asyncio.ensure_future(self._expect_key(settings.TURTLEMQ_AUTH_TIMEOUT))

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        """Close from the broker's end; nothing more is sent, and task events go by the database.

        Until the server reports the socket gone (``disconnect``), the
        connection lives on here, but a frame sent meanwhile is dropped by the
        server: an outcome sent then would be recorded as delivered and never
        arrive. So it is not sent; the database keeps it owed to the clientId,
        and a released worker's tasks go back to the queue as usual.
        """
        self._closing = True
        local.unregister(self.channel_name)
        await super().close(code, reason)

    async def disconnect(self, code: int) -> None:
        local.unregister(self.channel_name)
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
        if self._key_group is not None:
            await self.channel_layer.group_discard(self._key_group, self.channel_name)
        if self.connection_id is not None:
            await self._group_commit.submit(dispatch.Release(self.connection_id))
        await super().disconnect(code)

    # --- frames from the peer ---------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.close(code=CLOSE_UNSUPPORTED_DATA)
            return
        limit = self._max_frame_bytes
        if len(text_data) > limit // 4 and len(text_data.encode()) > limit:
            await self.close(code=CLOSE_MESSAGE_TOO_BIG)
            return
        if self.refused:
            return
        if not self._frames.take():
            await self.send_error(ProtocolError(ErrorCode.RATE_LIMITED, RATE_LIMITED_MESSAGE), _readable(text_data))
            return
        obj: Mapping[str, Any] = {}
        try:
            if self.grant is None:
                await self._authenticate_first_frame(text_data)
            obj = protocol.decode(text_data)
            frame = protocol.parse(obj, PARSERS)
            access.authorize(self.grant, obj["type"], frame)
            await self.FRAME_HANDLERS[obj["type"]](self, text_data, obj, frame)
        except access.Unauthenticated as exc:
            await self._refuse(exc, obj)
        except ProtocolError as exc:
            await self._report(exc, obj)
        except NodeStopped:
            await self.close(code=CLOSE_GOING_AWAY)  # registering while this process shuts down

    async def _report(self, exc: ProtocolError, obj: Mapping[str, Any]) -> None:
        """The ERROR frame for a refused frame (and, for a task the worker does not hold, rule 4)."""
        await self.send_error(exc, obj)
        if isinstance(exc, dispatch.UnknownTask):
            # Rule 4: remind the worker of what it really holds.
            for task_id, data in exc.held:
                await self.send_frame(protocol.request_task_frame(task_id, data))

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
        submit = dispatch.Submit(
            self.channel_name,
            self.client_id,
            frame.message_id,
            frame.data,
            frame.timeout,
            frame.max_attempts,
            self._unanswered,
        )
        self._unanswered += 1  # before the outcome can arrive, which counts it down
        await self._enqueue(submit, obj, on_error=self._unanswered_refused)

    def _unanswered_refused(self) -> None:
        self._unanswered -= 1

    async def on_response_task(self, text: str, obj: Mapping[str, Any], frame: protocol.ResponseTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await self._enqueue(dispatch.Complete(self.connection_id, self.channel_name, frame.task_id, frame.data), obj)

    async def on_fail_task(self, text: str, obj: Mapping[str, Any], frame: protocol.FailTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await self._enqueue(dispatch.Fail(self.connection_id, self.channel_name, frame.task_id, frame.error), obj)

    async def on_touch_task(self, text: str, obj: Mapping[str, Any], frame: protocol.TouchTask) -> None:
        self._require_role(Connection.Role.WORKER)
        await self._enqueue(dispatch.Touch(self.connection_id, frame.task_id), obj)

    async def on_status(self, text: str, obj: Mapping[str, Any], frame: protocol.Status) -> None:
        await self._settle()  # the status counts what this connection sent before
        await self.send_frame(protocol.status_frame(await broker_status()))

    # --- channel-layer events --------------------------------------------------------

    async def task_assign(self, event: events.TaskAssignEvent) -> None:
        """A task for this worker from another process: send it as REQUEST_TASK."""
        await self.send_assignment(dispatch.Assignment(self.channel_name, event["task_id"], event["data"]))

    async def send_assignment(self, assignment: dispatch.Assignment) -> None:
        """A task for this worker (``broker.local``): send it as REQUEST_TASK (not once closing, see ``close``)."""
        if self._closing:
            return  # the worker's release takes it back
        await self.send_frame(protocol.request_task_frame(assignment.task_id, assignment.data))

    async def node_going_away(self, event: events.NodeGoingAwayEvent) -> None:
        """This broker process stopped serving the connection (shutdown, or declared dead): the peer reconnects."""
        await self.close(code=CLOSE_GOING_AWAY)

    async def task_outcome(self, event: events.TaskOutcomeEvent) -> None:
        """The outcome of one of this client's tasks from another process: send it, then record the delivery."""
        await self.send_outcome(
            dispatch.Outcome(self.channel_name, event["task_id"], event["message_id"], event["ok"], event["data"])
        )

    async def send_outcome(self, outcome: dispatch.Outcome) -> None:
        """The outcome of one of this client's tasks (``broker.local``): send it, then record the delivery.

        Not once the connection is closing (see ``close``): the outcome stays owed.
        """
        if self._closing:
            return
        if outcome.ok:
            await self.send_frame(protocol.response_task_frame(outcome.message_id, outcome.data))
        else:
            await self.send_frame(protocol.task_failed_frame(outcome.message_id, outcome.data))
        self._unanswered = max(0, self._unanswered - 1)
        self._group_commit.note_delivered(outcome.task_id)

    async def access_changed(self, event: access.KeyChangedEvent) -> None:
        """This connection's key changed: adopt its new grant, or close if it was revoked."""
        grant = await current_grant(event["key_id"])
        if grant is None:
            await self._refuse(access.Unauthenticated("the access key of this connection was revoked"), {})
        else:
            self.grant = grant

    # --- access ----------------------------------------------------------------------

    async def _authenticate(self, token: object) -> None:
        """Adopt the grant of the key ``token``; raise :class:`access.Unauthenticated` for a bad one."""
        if not isinstance(token, str) or not token:
            raise access.Unauthenticated(NO_KEY_MESSAGE)
        grant = await authenticate(token)
        if grant is None:
            raise access.Unauthenticated("the access key is wrong or revoked")
        self.grant = grant
        self._key_group = access.key_group(grant.key_id)
        await self.channel_layer.group_add(self._key_group, self.channel_name)

    async def _authenticate_first_frame(self, text: str) -> None:
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
        try:
            obj = protocol.decode(text)
        except ProtocolError:
            obj = {}
        try:
            await self._authenticate(obj.get("token"))
        except access.Unauthenticated as exc:
            exc.ref = protocol.ref_of(obj)
            raise

    async def _expect_key(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self.grant is None:
            await self._refuse(access.Unauthenticated(f"no access key within {timeout:g} s; {NO_KEY_MESSAGE}"), {})

    async def _refuse(self, exc: access.Unauthenticated, obj: Mapping[str, Any]) -> None:
        """ERROR UNAUTHORIZED, then close with 4401 (PROTOCOL.md, Errors)."""
        if self.refused:
            return
        self.refused = True
        self.grant = None
        await self.send_error(exc, obj)
        await self.close(code=CLOSE_UNAUTHORIZED)

    # --- helpers ---------------------------------------------------------------------

    async def send_frame(self, frame: Mapping[str, Any]) -> None:
        # Straight to the server: AsyncWebsocketConsumer.send only builds this message.
        await self.base_send({"type": "websocket.send", "text": protocol.encode(frame)})

    async def send_error(self, exc: ProtocolError, obj: Mapping[str, Any]) -> None:
        ref = exc.ref or (protocol.ref_of(obj) if obj else {})
        await self.send_frame(protocol.error_frame(exc.code, exc.message, ref))

    async def ring(self, effects: dispatch.Effects) -> None:
        """Announce effects; those meant for a connection of this process skip the channel layer."""
        await events.ring(effects, self.channel_layer)

    async def _enqueue(
        self, operation: dispatch.Operation, obj: Mapping[str, Any], on_error: Callable[[], None] | None = None
    ) -> None:
        """Queue a task operation for the group commit and go on reading frames.

        Not waiting for the commit lets a burst of frames from one connection
        fill one batch instead of taking one transaction each. At most
        ``PIPELINE_DEPTH`` operations wait at a time (then the connection's
        next frame waits, and the server stops reading its socket); an error
        is reported as the ERROR frame when the operation's batch is done.
        """
        while self._pipelined >= PIPELINE_DEPTH:
            await self._pipeline_change()
        self._pipelined += 1

        def settled(error: BaseException | None) -> None:
            self._pipelined -= 1
            if self._pipeline_moved is not None:
                self._pipeline_moved.set_result(None)
                self._pipeline_moved = None
            if error is not None and not isinstance(error, asyncio.CancelledError):
                self._refused(error, obj, on_error)

        self._group_commit.enqueue(operation, settled)

    def _pipeline_change(self) -> asyncio.Future[None]:
        """A future done when the next of this connection's pipelined operations is done."""
        if self._pipeline_moved is None:
            self._pipeline_moved = asyncio.get_running_loop().create_future()
        return self._pipeline_moved

    def _refused(self, exc: BaseException, obj: Mapping[str, Any], on_error: Callable[[], None] | None) -> None:
        if on_error is not None:
            on_error()
        if isinstance(exc, ProtocolError):
            report = asyncio.ensure_future(self._report(exc, obj))
        else:
            # Nothing of the frame was committed (the database failed): the peer must not go on as if it were.
            logger.error("could not handle a %s frame: %r; closing the connection", obj.get("type"), exc)
            report = asyncio.ensure_future(self.close(code=CLOSE_INTERNAL_ERROR))
        self._reports.add(report)
        report.add_done_callback(self._reported)

    def _reported(self, report: asyncio.Future[None]) -> None:
        self._reports.discard(report)
        if not report.cancelled() and report.exception() is not None:
            # The connection closed meanwhile: nobody is left to tell.
            logger.debug("could not report a refused frame: %r", report.exception())

    async def _settle(self) -> None:
        """Wait until the task operations this connection queued are committed."""
        while self._pipelined:
            await self._pipeline_change()

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
