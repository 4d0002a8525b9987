"""Human-written durations for the command line: ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or ``1d12h``.

Whole numbers with a unit each, largest unit first or not: ``1h30m`` and
``30m1h`` mean the same. A bare number is refused rather than guessed at,
since ``--older-than 7`` could mean seven seconds or seven days, and so is
an upper-case unit (is ``1M`` a minute or a month?).
"""

from __future__ import annotations

import re
from datetime import timedelta

UNITS: dict[str, timedelta] = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
}

_PART = re.compile(r"(\d+)([smhdw])")
_WHOLE = re.compile(r"(?:\d+[smhdw])+")


def parse_duration(text: str) -> timedelta:
    """Turn ``"7d"`` or ``"1h30m"`` into a ``timedelta``; raise ``ValueError`` with a readable message otherwise."""
    cleaned = text.strip()
    if not _WHOLE.fullmatch(cleaned):
        raise ValueError(
            f"{text!r} is not a duration: use a whole number and a unit, s (seconds), m (minutes), h (hours), "
            "d (days) or w (weeks), e.g. 30s, 15m, 12h, 7d, 2w or 1d12h"
        )
    total = timedelta()
    for amount, unit in _PART.findall(cleaned):
        try:
            total += int(amount) * UNITS[unit]
        except OverflowError:
            raise ValueError(f"{text!r} is too long a duration") from None
    return total
