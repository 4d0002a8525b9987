"""Topic names and subscription patterns.

A topic name is one or more dot-separated words (``news.sports.tennis``); a
word is letters, digits, ``_`` and ``-``. A subscription pattern is a name in
which a word may also be ``*`` (exactly one word) or ``#`` (zero or more
words), as in AMQP topic exchanges. Matching is done here, in Python, so that
it is the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError

MAX_NAME_LENGTH = 200
ONE_WORD = "*"
ANY_WORDS = "#"

_WORD = re.compile(r"[A-Za-z0-9_-]+\Z")


def is_topic_name(value: str) -> bool:
    """Whether ``value`` is a valid (exact) topic name."""
    return 0 < len(value) <= MAX_NAME_LENGTH and all(_WORD.match(word) for word in value.split("."))


def is_pattern(value: str) -> bool:
    """Whether ``value`` is a valid subscription pattern (an exact name is one too)."""
    return 0 < len(value) <= MAX_NAME_LENGTH and all(
        word in (ONE_WORD, ANY_WORDS) or _WORD.match(word) for word in value.split(".")
    )


def has_wildcards(pattern: str) -> bool:
    """Whether a valid pattern uses ``*`` or ``#`` (and so may match several topics)."""
    return any(word in (ONE_WORD, ANY_WORDS) for word in pattern.split("."))


def validate_topic_name(value: str) -> None:
    """Django validator for :attr:`Topic.name`."""
    if not is_topic_name(value):
        raise ValidationError(
            "A topic name is dot-separated words of letters, digits, '_' and '-' (at most %(max)d characters).",
            code="invalid_topic_name",
            params={"max": MAX_NAME_LENGTH},
        )


def matches(pattern: str, name: str) -> bool:
    """Whether topic ``name`` matches subscription ``pattern``."""
    return _matches(tuple(pattern.split(".")), tuple(name.split(".")))


def _matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    # reachable[j]: the pattern read so far can consume exactly words[:j].
    reachable = [True] + [False] * len(words)
    for token in pattern:
        if token == ANY_WORDS:
            # Zero or more words: everything at or after the first reachable index.
            first = next((j for j, ok in enumerate(reachable) if ok), None)
            reachable = [first is not None and j >= first for j in range(len(words) + 1)]
        else:
            reachable = [False] + [reachable[j] and (token == ONE_WORD or token == words[j]) for j in range(len(words))]
    return reachable[-1]
