"""Access control: access keys, what a key grants, and allowed origins (PROTOCOL.md, "Access control").

A key looks like ``tmq_1a2b3c4d_<43 random characters>``: the part up to the
second underscore is its *prefix*, stored in the clear so that an operator can
tell keys apart and so that a presented key is found by an indexed look-up;
the database holds only the SHA-256 of the whole key, compared in constant
time. The random part carries 256 bits, which is why a plain hash is enough
(a slow password hash protects guessable secrets, and these are not).

When ``TURTLEMQ_AUTH`` is on, a connection presents a key (``?token=``, an
``Authorization: Bearer`` header, or a ``token`` field of its first frame) and
is then held to its :class:`Grant`, which says which frames it may send:

=================================================  ============================
frame                                              needs
=================================================  ============================
REGISTER_CLIENT, REQUEST_TASK                      client
REGISTER_WORKER, RESPONSE_TASK, FAIL_TASK,         worker
TOUCH_TASK
PUBLISH                                            publisher, topic allowed
SUBSCRIBE, UNSUBSCRIBE                             subscriber, pattern allowed
LIST_TOPICS                                        subscriber
STATUS                                             any valid key
=================================================  ============================

A missing, wrong or revoked key is :class:`Unauthenticated` (the connection is
closed with 4401); a valid key used beyond its grant is :class:`Unauthorized`
(the frame is refused, the connection stays open).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypedDict
from urllib.parse import parse_qs

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from subscriptions.names import ANY_WORDS, ONE_WORD, is_pattern, matches

from .models import AccessKey
from .protocol import ErrorCode, ProtocolError

KEY_SCHEME = "tmq_"
PREFIX_LENGTH = len(KEY_SCHEME) + 8  # "tmq_" and 8 hex digits
MAX_KEY_LENGTH = 200  # longer presented keys are refused without hashing them
# ``last_used_at`` is written at most this often per key, so that a busy key
# does not cost a write per connection.
LAST_USED_PRECISION = timedelta(minutes=1)

ROLES = frozenset(AccessKey.Role.values)
CLIENT, WORKER, PUBLISHER, SUBSCRIBER = (str(role) for role in AccessKey.Role)

# The role each frame type needs; a type not listed (STATUS) needs only a valid key.
FRAME_ROLES: dict[str, str] = {
    "REGISTER_CLIENT": CLIENT,
    "REQUEST_TASK": CLIENT,
    "REGISTER_WORKER": WORKER,
    "RESPONSE_TASK": WORKER,
    "FAIL_TASK": WORKER,
    "TOUCH_TASK": WORKER,
    "PUBLISH": PUBLISHER,
    "LIST_TOPICS": SUBSCRIBER,
    "SUBSCRIBE": SUBSCRIBER,
    "UNSUBSCRIBE": SUBSCRIBER,
}


class Unauthorized(ProtocolError):
    """A valid key used for something it does not grant: the frame is refused, the connection stays."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAUTHORIZED, message)


class Unauthenticated(Unauthorized):
    """No valid key was presented (missing, wrong or revoked): the broker closes with 4401."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a connection may do: the roles of its key and the topic patterns it is held to."""

    key_id: int | None  # None: access control is off
    roles: frozenset[str]
    topics: tuple[str, ...] = ()  # patterns; empty means every topic

    def allows_topic(self, name: str) -> bool:
        """Whether the key may publish to the topic ``name``."""
        return not self.topics or any(matches(allowed, name) for allowed in self.topics)

    def allows_pattern(self, pattern: str) -> bool:
        """Whether every topic that ``pattern`` matches is one the key may follow."""
        return not self.topics or any(pattern_covers(allowed, pattern) for allowed in self.topics)


# What a connection may do when access control is off.
FULL_ACCESS = Grant(key_id=None, roles=ROLES)


def authorize(grant: Grant, frame_type: str, frame: Any) -> None:
    """Raise :class:`Unauthorized` unless ``grant`` allows this parsed frame."""
    if grant is FULL_ACCESS:
        return
    role = FRAME_ROLES.get(frame_type)
    if role is not None and role not in grant.roles:
        raise Unauthorized(f"this access key does not grant the {role} role that {frame_type} needs")
    if frame_type == "PUBLISH" and not grant.allows_topic(frame.topic):
        raise Unauthorized(f"this access key may not publish to {frame.topic!r}")
    if frame_type in ("SUBSCRIBE", "UNSUBSCRIBE") and not grant.allows_pattern(frame.topic):
        raise Unauthorized(f"this access key may not follow {frame.topic!r}")


# --- keys ------------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def issue_key(access_key: AccessKey) -> str:
    """Give an unsaved :class:`AccessKey` a new random key, save it, and return the key (shown only now)."""
    key = f"{KEY_SCHEME}{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    access_key.prefix = key[:PREFIX_LENGTH]
    access_key.key_hash = hash_key(key)
    access_key.full_clean()
    access_key.save()
    return key


def create_key(name: str, roles: Iterable[str], topics: Iterable[str] = ()) -> tuple[AccessKey, str]:
    """Make a key with ``roles`` (and ``topics`` patterns); returns the row and the key, shown only once.

    Raises ``ValueError`` for an unknown role and Django's ``ValidationError``
    for a bad topic pattern or name.
    """
    roles = set(roles)
    unknown = roles - ROLES
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(sorted(unknown))}; choose from {', '.join(sorted(ROLES))}")
    access_key = AccessKey(name=name, topics="\n".join(topics), **{role: role in roles for role in ROLES})
    return access_key, issue_key(access_key)


def authenticate(presented: str) -> Grant | None:
    """The grant of an active key, or ``None`` for a wrong or revoked one; notes when it was used."""
    if not presented.startswith(KEY_SCHEME) or len(presented) > MAX_KEY_LENGTH:
        return None
    digest = hash_key(presented)
    now = timezone.now()
    with transaction.atomic():
        for candidate in AccessKey.objects.active().filter(prefix=presented[:PREFIX_LENGTH]):
            if hmac.compare_digest(candidate.key_hash, digest):
                if candidate.last_used_at is None or candidate.last_used_at < now - LAST_USED_PRECISION:
                    AccessKey.objects.filter(pk=candidate.pk).update(last_used_at=now)
                return _grant_of(candidate)
    return None


def authenticate_bearer(authorization: str | None) -> Grant | None:
    """The grant of the key in an HTTP ``Authorization: Bearer KEY`` header, or ``None``."""
    token = bearer_token(authorization)
    return authenticate(token) if token is not None else None


def current_grant(key_id: int) -> Grant | None:
    """The grant of key ``key_id`` as it stands now, or ``None`` once it is revoked (or gone)."""
    access_key = AccessKey.objects.active().filter(pk=key_id).first()
    return _grant_of(access_key) if access_key is not None else None


def revoke_keys(key_ids: Iterable[int]) -> list[int]:
    """Revoke keys; returns the ids of those that were active until now."""
    with transaction.atomic():
        revoked = list(AccessKey.objects.active().filter(pk__in=list(key_ids)).values_list("pk", flat=True))
        AccessKey.objects.filter(pk__in=revoked).update(active=False)
    return revoked


def _grant_of(access_key: AccessKey) -> Grant:
    return Grant(key_id=access_key.pk, roles=access_key.roles, topics=access_key.topic_patterns)


# --- telling live connections that their key changed ---------------------------------------------
# Every connection that authenticated with a key is in the key's group; a
# changed or revoked key rings it, and each consumer reads its grant afresh
# (closing with 4401 when the key is revoked). A lost doorbell leaves that
# connection on its old grant until it reconnects.


class KeyChangedEvent(TypedDict):
    type: Literal["access.changed"]
    key_id: int


def key_group(key_id: int) -> str:
    """The channel-layer group of the connections that use key ``key_id``."""
    return f"access-key.{key_id}"


async def announce_key_changes(key_ids: Iterable[int], layer: BaseChannelLayer | None = None) -> None:
    layer = layer or get_channel_layer()
    for key_id in key_ids:
        event: KeyChangedEvent = {"type": "access.changed", "key_id": key_id}
        await layer.group_send(key_group(key_id), dict(event))


def announce_key_changes_from_sync(key_ids: Iterable[int]) -> None:
    """``announce_key_changes`` for the admin; call it after the commit."""
    key_ids = list(key_ids)
    if key_ids:
        async_to_sync(announce_key_changes)(key_ids)


# --- what a WebSocket handshake carries -----------------------------------------------------


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def token_from_scope(scope: Mapping[str, Any]) -> str | None:
    """The key a handshake presents: the ``token`` query parameter, else an ``Authorization: Bearer`` header."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    return bearer_token(_header(scope, b"authorization"))


def bearer_token(authorization: str | None) -> str | None:
    """The key in an ``Authorization: Bearer KEY`` header value (the scheme is case-insensitive)."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def origin_allowed(scope: Mapping[str, Any]) -> bool:
    """Whether a WebSocket handshake may proceed under ``TURTLEMQ_ALLOWED_ORIGINS``.

    With the setting empty, any origin is accepted. Otherwise a browser's
    ``Origin`` must be listed; a handshake without ``Origin`` (a program, not a
    browser page) is accepted and left to the access keys.
    """
    allowed = settings.TURTLEMQ_ALLOWED_ORIGINS
    origin = _header(scope, b"origin")
    if not allowed or origin is None:
        return True
    return normalize_origin(origin) in {normalize_origin(entry) for entry in allowed}


def normalize_origin(origin: str) -> str:
    """Origins compare case-insensitively, without a trailing slash."""
    return origin.strip().rstrip("/").lower()


# --- topic patterns within topic patterns -------------------------------------------------------


def pattern_covers(outer: str, inner: str) -> bool:
    """Whether every topic name that pattern ``inner`` matches is also matched by pattern ``outer``.

    Both patterns are read as automata over words; words that neither names
    behave alike, so one stand-in word represents them all, and the check is a
    search of the pair of (determinised) automata for a name (of one word or
    more) that ``inner`` accepts and ``outer`` does not. Patterns are short, so
    this stays small.
    """
    if not (is_pattern(outer) and is_pattern(inner)):
        return False
    outer_tokens, inner_tokens = tuple(outer.split(".")), tuple(inner.split("."))
    literals = {t for t in outer_tokens + inner_tokens if t not in (ONE_WORD, ANY_WORDS)}
    alphabet = [*literals, None]  # None stands for any other word
    start = (_closure(inner_tokens, {0}), _closure(outer_tokens, {0}), False)
    seen, pending = {start}, [start]
    while pending:
        inner_states, outer_states, some_words = pending.pop()
        if some_words and len(inner_tokens) in inner_states and len(outer_tokens) not in outer_states:
            return False  # a name that inner matches and outer does not
        for word in alphabet:
            following = (_step(inner_tokens, inner_states, word), _step(outer_tokens, outer_states, word), True)
            if following[0] and following not in seen:
                seen.add(following)
                pending.append(following)
    return True


def _closure(tokens: tuple[str, ...], states: set[int]) -> frozenset[int]:
    # State i: tokens[:i] have consumed the words so far; a '#' may consume none.
    closed = set(states)
    for i in sorted(states):
        while i < len(tokens) and tokens[i] == ANY_WORDS:
            i += 1
            closed.add(i)
    return frozenset(closed)


def _step(tokens: tuple[str, ...], states: frozenset[int], word: str | None) -> frozenset[int]:
    following: set[int] = set()
    for i in states:
        if i == len(tokens):
            continue
        if tokens[i] == ANY_WORDS:
            following.add(i)
        elif tokens[i] == ONE_WORD or tokens[i] == word:
            following.add(i + 1)
    return _closure(tokens, following)
