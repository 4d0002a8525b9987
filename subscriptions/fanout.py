"""Fan-out of topic messages within one broker process.

Each broker process (each event loop) has one channel of its own, the
*process channel*, which joins the group ``topic.<pk>`` while at least one of
its connections follows that topic. ``announce_message`` therefore costs one
layer message per process and topic instead of one per subscriber; the
process's reader receives it, encodes the MESSAGE frame once and offers it to
each local follower, which applies its own exactly-once, in-order rule
(``TopicFramesMixin.offer_topic_message``).

That holds on both layers TurtleMQ configures: the in-memory layer (one
process) and channels-redis (several processes; a published message is one
Redis message per process that follows the topic). On any other layer each
connection joins the group itself and gets ``topic.message`` on its own
channel, one layer message per subscriber.

The process channel on channels-redis
-------------------------------------
channels-redis keeps receive state on the layer object: a count of the
``receive`` calls under way, the event loop they run in, a lock that one of
them holds while it pops the next message for all of them, a buffer per
channel, and per-channel locks held by background clean-up tasks. The layer
object outlives event loops (a test suite runs one loop per test), and that
state does not survive a loop ending in the middle of a ``receive``: a lock
left behind bound to the old loop makes every later ``receive`` fail with
"bound to a different event loop". The connections' ``receive`` calls live with
that (each is cancelled and awaited by its consumer), but a process-wide reader
is, by design, always in the middle of one.

So on channels-redis the process channel lives on a layer instance of its own,
made for the running event loop and configured like the connections' layer
(:func:`own_layer`: the same Redis, prefix and expiries, hence the same
groups). Its receive state is the reader's alone and goes with the loop; its
process channel has a Redis key of its own, read by the reader with no
contention from the connections' receives.

Ending the reader
-----------------
The reader still has to end when asked, and one cancellation is not always
enough: on Python 3.11 redis-py can swallow one (see :func:`broker.aio.end_task`), after which
channels-redis waits in BZPOPMIN for as long as the channel stays empty, and a
closing loop would wait with it. Hence two tasks per process:

* the *reader* receives and delivers, and nothing else;
* its *keeper* renews the group memberships on a timer and, when it is itself
  cancelled, cancels the reader again until it has ended.

Whoever stops them:

* :func:`stop_process_fanout`, called when the broker node stops (SIGTERM
  under daphne, the lifespan shutdown under uvicorn, the end of each test),
  ends the keeper, hence the reader, takes the process channel out of its
  groups and closes the connections of its layer.
* An event loop that ends without it (``asyncio.run``, the runner
  pytest-asyncio gives each test) cancels every task it still has and waits
  for them: the keeper waits in turn for the reader. Neither takes its
  cancellation for a lost Redis connection (redis-py may report one as the
  other) and starts a retry in a closing loop: both check
  ``Task.cancelling()``. channels-redis closes the layer's connections as the
  loop closes. The group memberships stay in Redis until ``group_expiry``;
  what is sent to them meanwhile goes to a key nobody reads and expires after
  the layer's ``expiry``.

Failures and guarantees
-----------------------
* Redis away: a failed read is logged and retried every
  ``READ_RETRY_SECONDS``; before reading again the process channel joins its
  groups again (a Redis restarted without persistence has lost them). A
  message announced meanwhile is a lost doorbell only: each follower fills the
  gap from the database when the next message of the topic reveals it.
* Membership expiry: a group member older than the layer's ``group_expiry``
  (one day by default, on both layers) is dropped by the next ``group_send``,
  and a process channel may follow a topic for weeks. The keeper re-adds it to
  each of its groups every quarter of ``group_expiry``.
* Membership changes (the first follower of a topic joins its group, the last
  one leaves it, a refresh) are serialised by one lock per process: two Redis
  commands on two pooled connections may run in either order, which could
  leave the channel in a group it left or out of one it follows. Messages are
  delivered without that lock.

The registry below is a routing cache, not broker state: it only says which
live connections of this process follow which topic, exactly what their group
memberships used to say. The database still holds every message, and a
follower that misses one fills the gap from it on the next.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from channels.layers import InMemoryChannelLayer

from broker.aio import cancelling as _cancelled
from broker.aio import end_task as _end
from broker.aio import is_redis_layer
from broker.protocol import encode

from . import protocol
from .events import TopicMessageEvent, split_messages, topic_group

if TYPE_CHECKING:
    from channels.layers import BaseChannelLayer

logger = logging.getLogger("turtlemq.subscriptions")

# After a failed read of the process channel (Redis away), wait this long before the next.
READ_RETRY_SECONDS = 1.0
# The process channel renews its group memberships this often, as a share of the layer's group_expiry.
REFRESH_SHARE = 0.25
# When the node stops, leaving the groups may take this long (Redis may be away) before it gives up.
LEAVE_TIMEOUT_SECONDS = 2.0


class Follower(Protocol):
    """A connection that follows topics: ``TopicFramesMixin``."""

    channel_name: str

    async def offer_topic_message(self, event: TopicMessageEvent, text: str) -> None: ...


def shares_process_channel(layer: BaseChannelLayer) -> bool:
    """Whether connections on ``layer`` hear topics through the process channel (the layers we know)."""
    return isinstance(layer, InMemoryChannelLayer) or is_redis_layer(layer)


def own_layer(layer: BaseChannelLayer) -> BaseChannelLayer:
    """The layer the process channel lives on: for channels-redis a new instance configured like ``layer``.

    The same Redis hosts, prefix, expiries and capacities, so the same groups
    and keys; its own client prefix and receive state (see the module's
    docstring). The in-memory layer keeps its state in the instance: its
    process channel must live on the connections' layer itself.
    """
    if not is_redis_layer(layer):
        return layer
    own = type(layer)(
        hosts=layer.hosts,
        prefix=layer.prefix,
        expiry=layer.expiry,
        group_expiry=layer.group_expiry,
        capacity=layer.capacity,
        channel_capacity=dict(layer.channel_capacity),  # compiled patterns are accepted as they are
    )
    # Messages must decode as the publishers encode them (format, encryption
    # keys), which the instance keeps only in its serializer.
    own._serializer = layer._serializer
    return own


class ProcessFanout:
    """This process's channel for topic messages and the local followers of each topic."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer  # the connections' layer
        self.shared = shares_process_channel(layer)  # one layer message per process, not per follower
        self.channel_layer = own_layer(layer) if self.shared else layer  # where the process channel lives
        self.channel: str | None = None
        self.followers: dict[int, set[Follower]] = {}
        # Topics whose group the channel could not leave (Redis away): left at the next refresh.
        self.leftovers: set[int] = set()
        self.refresh_seconds = max(1.0, float(getattr(layer, "group_expiry", 86400)) * REFRESH_SHARE)
        self._membership = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None  # runs the reader and renews the memberships

    # --- followers ------------------------------------------------------------------

    async def follow(self, topic_id: int, follower: Follower) -> None:
        """Route ``topic_id``'s messages to ``follower``; returns once it hears the topic's group."""
        if not self.shared:
            await self.layer.group_add(topic_group(topic_id), follower.channel_name)
            return
        async with self._membership:
            channel = await self._start()
            followers = self.followers.get(topic_id)
            if followers is None:
                # Join before registering: should the layer fail, nothing here has changed.
                await self.channel_layer.group_add(topic_group(topic_id), channel)
                self.leftovers.discard(topic_id)
                followers = self.followers[topic_id] = set()
            followers.add(follower)

    async def unfollow(self, topic_id: int, follower: Follower) -> None:
        """Stop routing ``topic_id`` to ``follower``; the last follower takes the process channel out of the group."""
        if not self.shared:
            await self.layer.group_discard(topic_group(topic_id), follower.channel_name)
            return
        async with self._membership:
            followers = self.followers.get(topic_id)
            if followers is None or follower not in followers:
                return
            followers.discard(follower)
            if followers:
                return
            del self.followers[topic_id]
            if self.channel is None:
                return
            try:
                await self.channel_layer.group_discard(topic_group(topic_id), self.channel)
            except Exception:
                # Called as connections close: failing them helps nobody. Until the
                # next refresh leaves the group, the reader drops what arrives for it.
                self.leftovers.add(topic_id)
                logger.warning("could not leave the group of topic %s; retrying at the next refresh", topic_id)

    # --- the process channel ----------------------------------------------------------

    async def _start(self) -> str:
        """The process channel, with its keeper (and so its reader) running. Called under the membership lock."""
        if self.channel is None:
            self.channel = await self.channel_layer.new_channel()
        if self._keeper is None or self._keeper.done():
            loop = asyncio.get_running_loop()
            self._keeper = loop.create_task(self._keep(self.channel), name="turtlemq topic keeper")
        return self.channel

    async def _keep(self, channel: str) -> None:
        """Run the reader and renew the memberships until cancelled; then see the reader end."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(channel), name="turtlemq topic reader")
        try:
            while True:
                await asyncio.wait({reader}, timeout=self.refresh_seconds)
                if reader.done():
                    if reader.cancelled():
                        raise asyncio.CancelledError  # someone is stopping the fan-out
                    # Only a bug ends the reader: say so, and read on.
                    logger.error("the topic reader failed; starting another", exc_info=reader.exception())
                    await asyncio.sleep(READ_RETRY_SECONDS)
                    reader = loop.create_task(self._read(channel), name="turtlemq topic reader")
                    continue
                try:
                    await self.refresh()
                except Exception:
                    if _cancelled():
                        raise asyncio.CancelledError from None
                    # Three more tries before the memberships expire; the reader
                    # also joins again on its own once it sees Redis fail.
                    logger.exception("could not renew the topic groups; retrying in %g s", self.refresh_seconds)
                if _cancelled():
                    raise asyncio.CancelledError  # a cancellation redis-py swallowed (see broker.aio.end_task)
        finally:
            await _end(reader)

    async def _read(self, channel: str) -> None:
        """Receive the process channel's events and deliver them, until cancelled; retry after a failed read."""
        failing = False
        while True:
            try:
                if failing:
                    await self.refresh()  # a restarted Redis may have lost our groups
                event: dict[str, Any] = await self.channel_layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _cancelled():
                    # The loop is closing, and redis-py reported it as a lost
                    # connection: end as cancelled, start no retry.
                    raise asyncio.CancelledError from None
                if failing:
                    logger.warning("this process's topic channel is still unreadable (%s); retrying", exc)
                else:
                    logger.exception("could not read this process's topic channel; retrying")
                failing = True
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            if _cancelled():
                raise asyncio.CancelledError  # a swallowed cancellation (see broker.aio.end_task): deliver no more
            if failing:
                logger.info("this process's topic channel is readable again")
                failing = False
            if event.get("type") == "topic.message":
                await self.deliver(event)  # type: ignore[arg-type]
            elif event.get("type") == "topic.messages":
                for message in split_messages(event):  # type: ignore[arg-type]
                    await self.deliver(message)

    async def refresh(self) -> None:
        """Join each followed topic's group again (a fresh join time), and leave the groups left behind."""
        async with self._membership:
            if self.channel is None:
                return
            for topic_id in list(self.followers):
                await self.channel_layer.group_add(topic_group(topic_id), self.channel)
            for topic_id in list(self.leftovers):
                await self.channel_layer.group_discard(topic_group(topic_id), self.channel)
                self.leftovers.discard(topic_id)

    async def deliver(self, event: TopicMessageEvent) -> None:
        """Offer one message to every local follower of its topic, the frame encoded once."""
        followers = self.followers.get(event["topic_id"])
        if not followers:
            return
        text = encode(protocol.message_frame(event["topic"], event["id"], event["data"]))
        for follower in list(followers):
            try:
                await follower.offer_topic_message(event, text)
            except Exception:
                # One broken connection must not cost the others their message.
                logger.exception("could not offer message %s of topic %s", event["id"], event["topic"])

    async def stop(self) -> None:
        """End the keeper and the reader, leave every group, forget the followers, close the layer's connections."""
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            await _end(keeper)
        async with self._membership:
            channel, topics = self.channel, {*self.followers, *self.leftovers}
            self.channel = None
            self.followers.clear()
            self.leftovers.clear()
            try:
                async with asyncio.timeout(LEAVE_TIMEOUT_SECONDS):
                    if channel is not None:
                        for topic_id in sorted(topics):
                            await self.channel_layer.group_discard(topic_group(topic_id), channel)
                    if self.channel_layer is not self.layer and hasattr(self.channel_layer, "close_pools"):
                        await self.channel_layer.close_pools()
            except Exception:
                # The process is going: its memberships expire after group_expiry,
                # and what reaches them meanwhile goes nowhere and expires too.
                logger.warning("could not leave the topic groups of this process's channel", exc_info=True)


_fanouts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, ProcessFanout]] = weakref.WeakKeyDictionary()


def process_fanout(layer: BaseChannelLayer) -> ProcessFanout:
    """The fan-out of the running event loop (one per server process) for ``layer``."""
    per_loop = _fanouts.setdefault(asyncio.get_running_loop(), {})
    fanout = per_loop.get(id(layer))
    if fanout is None or fanout.layer is not layer:
        fanout = per_loop[id(layer)] = ProcessFanout(layer)
    return fanout


async def stop_process_fanout() -> None:
    """Stop the running event loop's fan-out: its reader ends, its process channel leaves every group.

    Called when the broker node stops (``BrokerNode.stop``); does nothing when
    no connection followed a topic, and may be called again. A connection that
    follows a topic afterwards starts a new fan-out.
    """
    for fanout in _fanouts.pop(asyncio.get_running_loop(), {}).values():
        await fanout.stop()
