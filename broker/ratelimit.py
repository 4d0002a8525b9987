"""The per-connection frame rate limit: a token bucket kept on the consumer instance.

A connection may send ``TURTLEMQ_MAX_FRAMES_PER_SECOND`` frames per second on
average and up to ``TURTLEMQ_FRAME_BURST`` in a burst; a frame beyond that is
answered with ERROR ``RATE_LIMITED`` and not processed, and the connection
stays open. The bucket belongs to one connection, so it lives and dies with
the consumer: there is nothing to share between processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows ``rate`` events per second on average and ``burst`` at once; ``rate <= 0`` allows everything."""

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def take(self) -> bool:
        """Spend one token if there is one; ``False`` means the event is over the limit."""
        if self.rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
