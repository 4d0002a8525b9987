"""Topic frames of the wire protocol: LIST_TOPICS, SUBSCRIBE, UNSUBSCRIBE, PUBLISH and their answers.

Parsers turn a decoded frame into a typed value or raise ``ProtocolError``
(``BAD_FRAME`` for a field of the wrong kind, ``BAD_EMAIL`` for a malformed
address), with the field validators of ``broker.protocol``. The frames the
broker sends about topics are built here too; ``message_frame`` is the one
place a MESSAGE is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from broker.protocol import ErrorCode, Parser, ProtocolError, optional_int, optional_str, ref_of, required_str

from .names import MAX_NAME_LENGTH, has_wildcards, is_pattern, is_topic_name

MAX_EMAIL_LENGTH = 254
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ListTopics:
    pass


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str  # an exact name or a pattern with * / #
    email: str | None  # also send this address an e-mail per message (exact names only)
    since: int | None  # replay stored messages with a higher id

    @property
    def exact(self) -> bool:
        return not has_wildcards(self.topic)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str
    email: str | None  # also remove this address's e-mail subscription

    @property
    def exact(self) -> bool:
        return not has_wildcards(self.topic)


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    data: str


def _bad(obj: Mapping[str, Any], message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, message, ref_of(obj))


def topic_name(obj: Mapping[str, Any]) -> str:
    """The ``topic`` field as an exact topic name (PUBLISH)."""
    name = required_str(obj, "topic", max_length=MAX_NAME_LENGTH, allow_empty=False)
    if not is_topic_name(name):
        raise _bad(obj, "'topic' must be dot-separated words of letters, digits, '_' and '-', without wildcards")
    return name


def topic_pattern(obj: Mapping[str, Any]) -> str:
    """The ``topic`` field as a subscription pattern: an exact name, or words with ``*`` and ``#``."""
    pattern = required_str(obj, "topic", max_length=MAX_NAME_LENGTH, allow_empty=False)
    if not is_pattern(pattern):
        raise _bad(obj, "'topic' must be dot-separated words of letters, digits, '_' and '-', or '*' and '#'")
    return pattern


def optional_email(obj: Mapping[str, Any], pattern: str) -> str | None:
    """The optional ``email`` field, validated (``BAD_EMAIL``); only with an exact topic name."""
    address = optional_str(obj, "email", max_length=MAX_EMAIL_LENGTH)
    if address is None:
        return None
    try:
        validate_email(address)
    except ValidationError:
        raise ProtocolError(ErrorCode.BAD_EMAIL, "'email' is not a valid e-mail address", ref_of(obj)) from None
    if has_wildcards(pattern):
        raise _bad(obj, "an e-mail subscription needs an exact topic name, not a pattern")
    return normalize_email(address)


def normalize_email(address: str) -> str:
    """Lower-case the domain part, which is case-insensitive (the local part may not be)."""
    local, _, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower()}"


def parse_list_topics(obj: Mapping[str, Any]) -> ListTopics:
    return ListTopics()


def parse_subscribe(obj: Mapping[str, Any]) -> Subscribe:
    pattern = topic_pattern(obj)
    return Subscribe(
        topic=pattern,
        email=optional_email(obj, pattern),
        since=optional_int(obj, "since", minimum=0, maximum=MAX_SEQ),
    )


def parse_unsubscribe(obj: Mapping[str, Any]) -> Unsubscribe:
    pattern = topic_pattern(obj)
    return Unsubscribe(topic=pattern, email=optional_email(obj, pattern))


def parse_publish(obj: Mapping[str, Any]) -> Publish:
    return Publish(topic=topic_name(obj), data=required_str(obj, "data"))


TOPIC_PARSERS: dict[str, Parser] = {
    "LIST_TOPICS": parse_list_topics,
    "SUBSCRIBE": parse_subscribe,
    "UNSUBSCRIBE": parse_unsubscribe,
    "PUBLISH": parse_publish,
}


# --- frames the broker sends ---------------------------------------------------


def topics_frame(names: list[str]) -> dict[str, Any]:
    return {"type": "TOPICS", "data": names}


def subscribed_frame(pattern: str, content: str, last_id: int | None = None) -> dict[str, Any]:
    """SUBSCRIBED; for an exact name also ``lastId``, the newest message id in ``content``.

    Live MESSAGEs (without ``since``) start after ``lastId``, so a client that
    reconnects can resume with ``since: lastId`` even if no message came.
    """
    frame: dict[str, Any] = {"type": "SUBSCRIBED", "topic": pattern, "data": content}
    if last_id is not None:
        frame["lastId"] = last_id
    return frame


def unsubscribed_frame(pattern: str) -> dict[str, Any]:
    return {"type": "UNSUBSCRIBED", "topic": pattern}


def published_frame(topic: str, seq: int) -> dict[str, Any]:
    return {"type": "PUBLISHED", "topic": topic, "id": seq}


def message_frame(topic: str, seq: int, data: str) -> dict[str, Any]:
    return {"type": "MESSAGE", "topic": topic, "id": seq, "data": data}
