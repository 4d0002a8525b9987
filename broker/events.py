"""Channel-layer events of the task broker: the doorbells rung after a commit.

Two events travel between consumers, possibly in different processes:
``task.assign`` to a worker's channel (becomes REQUEST_TASK) and
``task.outcome`` to a client's channel (becomes RESPONSE_TASK or
TASK_FAILED). A lost event delays but never loses work: the database still
says what is owed to whom. Effects for a connection of this process skip the
layer (``broker.local``). A third, ``node.going_away``, goes from a broker
process to its own connections when it stops serving them (a close with 1001).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Literal, TypedDict

from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, get_channel_layer

from . import inbox, local
from .dispatch import Assignment, Effects, Outcome

logger = logging.getLogger("turtlemq.broker")

# Seconds after which task events that could not go to other processes (Redis
# out of reach) are tried again, one after the other: about a quarter of a minute in all.
RING_AGAIN_AFTER = (0.5, 1.0, 2.0, 4.0, 8.0)

# The tries of each event loop (broker process) still under way (see _ring_again_later).
_ringing_again: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary()
)


class TaskAssignEvent(TypedDict):
    type: Literal["task.assign"]
    task_id: str
    data: str


class TaskOutcomeEvent(TypedDict):
    type: Literal["task.outcome"]
    task_id: int
    message_id: str
    ok: bool
    data: str


class NodeGoingAwayEvent(TypedDict):
    type: Literal["node.going_away"]


def assign_event(assignment: Assignment) -> TaskAssignEvent:
    return {"type": "task.assign", "task_id": assignment.task_id, "data": assignment.data}


def outcome_event(outcome: Outcome) -> TaskOutcomeEvent:
    return {
        "type": "task.outcome",
        "task_id": outcome.task_id,
        "message_id": outcome.message_id,
        "ok": outcome.ok,
        "data": outcome.data,
    }


async def ring(effects: Effects, layer: BaseChannelLayer | None = None, in_process: bool = True) -> None:
    """Announce committed effects: in-process to a connection of this process, else to the process that has it.

    Events for other processes take their inboxes on channels-redis (one
    message per process, ``broker.inbox``), layer messages on other layers.
    ``in_process=False`` for callers outside the broker's event loop (whose
    connections they must not write to): everything takes the layer.
    """
    if not effects:
        return
    remote: list[tuple[str, dict]] = []
    for assignment in effects.assignments:
        peer = local.peer(assignment.worker_channel) if in_process else None
        if peer is not None:
            await local.deliver(assignment.worker_channel, peer.send_assignment(assignment), "a task")
        else:
            remote.append((assignment.worker_channel, dict(assign_event(assignment))))
    for outcome in effects.outcomes:
        peer = local.peer(outcome.reply_channel) if in_process else None
        if peer is not None:
            await local.deliver(outcome.reply_channel, peer.send_outcome(outcome), "an outcome")
        else:
            remote.append((outcome.reply_channel, dict(outcome_event(outcome))))
    if not remote:
        return
    layer = layer or get_channel_layer()
    unsent = await _ring_remote(layer, remote, in_process)
    if unsent and in_process:
        _ring_again_later(layer, unsent)
    elif unsent:
        logger.error("could not announce %s task events over the channel layer", len(unsent))


async def _ring_remote(
    layer: BaseChannelLayer, remote: list[tuple[str, dict]], in_process: bool
) -> list[tuple[str, dict]]:
    """Send events to the processes of their channels; those that could not go (Redis out of reach), else []."""
    if in_process and inbox.supported(layer):
        try:
            remote = await inbox.post(layer, remote)
        except inbox.Unposted as exc:
            logger.warning(
                "could not post %s task events to other processes' inboxes: %r", len(exc.events), exc.__cause__
            )
            return exc.events
    for position, (channel, event) in enumerate(remote):
        try:
            await _send(layer, channel, event)
        except Exception as exc:
            logger.warning("could not send %s task events over the channel layer: %r", len(remote) - position, exc)
            return remote[position:]
    return []


def _ring_again_later(layer: BaseChannelLayer, events: list[tuple[str, dict]]) -> None:
    """Ring events that could not go again, in the background, after each of ``RING_AGAIN_AFTER``.

    A doorbell, not the truth, but one that never rings leaves a task with a
    worker that does not know it holds it until its lease runs out (an hour by
    default), and an outcome waiting for its client to resume: worth a few
    tries while Redis comes back. In the background, so that what follows
    (deliveries in this process above all) does not wait for Redis.
    """
    loop = asyncio.get_running_loop()
    pending = _ringing_again.setdefault(loop, set())
    retry = loop.create_task(_ring_again(layer, events), name="turtlemq task events rung again")
    pending.add(retry)
    retry.add_done_callback(pending.discard)


async def _ring_again(layer: BaseChannelLayer, events: list[tuple[str, dict]]) -> None:
    for delay in RING_AGAIN_AFTER:
        await asyncio.sleep(delay)
        events = await _ring_remote(layer, events, in_process=True)
        if not events:
            logger.info("task events that could not go earlier went now")
            return
    logger.error(
        "gave up %s task events: their tasks wait for their leases, their outcomes for their clients to resume",
        len(events),
    )


async def _send(layer: BaseChannelLayer, channel: str, event: dict) -> None:
    try:
        await layer.send(channel, event)
    except ChannelFull:
        # The database still holds the task; it is re-sent on resume or re-dispatch.
        logger.warning("channel %s is full; dropped %s for task %s", channel, event["type"], event["task_id"])


async def going_away(channels: list[str], layer: BaseChannelLayer | None = None) -> None:
    """Ask these connections of this process to close, so that their peers reconnect."""
    layer = layer or get_channel_layer()
    event: NodeGoingAwayEvent = {"type": "node.going_away"}
    for channel in channels:
        try:
            await layer.send(channel, dict(event))
        except ChannelFull:
            # Its peer stays on a connection the database counts as closed: a
            # worker gets no more tasks there until it reconnects.
            logger.warning("channel %s is full; could not ask it to close", channel)


def ring_from_sync(effects: Effects) -> None:
    """``ring`` for synchronous callers: the admin and management commands."""
    if effects:
        async_to_sync(ring)(effects, in_process=False)
