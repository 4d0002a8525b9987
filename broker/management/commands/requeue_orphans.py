"""``manage.py requeue_orphans``: put tasks held by vanished connections back in the queue."""

from __future__ import annotations

from typing import Any

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.management.base import BaseCommand

from broker import dispatch, events


class Command(BaseCommand):
    help = (
        "Put back in the queue every task held by a worker connection that is gone: closed, held by a "
        "stopped broker process, or by one whose heartbeat is older than TURTLEMQ_PROCESS_DEAD_AFTER. "
        "The broker does this by itself; the command is for when no broker process is running to do it."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        # An in-memory channel layer ends at this process: a task handed to a
        # worker from here would never reach it. Leave the tasks queued; the
        # broker's housekeeping hands them out within a tick.
        reaches_broker = not isinstance(get_channel_layer(), InMemoryChannelLayer)
        count, effects = dispatch.requeue_orphans(assign=reaches_broker)
        events.ring_from_sync(effects)
        noun = "task" if count == 1 else "tasks"
        self.stdout.write(f"{count} orphaned {noun} went back to the queue.")
        if effects.assignments:
            self.stdout.write(f"{len(effects.assignments)} of them went straight to idle workers.")
