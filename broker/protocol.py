"""The TurtleMQ wire protocol: frame parsing, validation and frame building.

Every WebSocket text frame holds one JSON object with a string ``type``. The
parser turns a raw frame into a typed value or raises :class:`ProtocolError`
with the code that PROTOCOL.md names; the consumer turns that into an ERROR
frame. Frames the broker sends are built here too, so that the wire format
lives in one module. Topic frames are parsed by ``subscriptions.protocol`` with
the field validators below.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

MAX_ID_LENGTH = 256
MAX_CONCURRENCY = 1000
MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0


class ErrorCode(StrEnum):
    """The ERROR codes of PROTOCOL.md."""

    BAD_JSON = "BAD_JSON"  # the frame is not valid JSON
    BAD_FRAME = "BAD_FRAME"  # not an object, no type, or a field of the wrong kind or size
    UNKNOWN_TYPE = "UNKNOWN_TYPE"  # a type the protocol does not define
    NOT_REGISTERED = "NOT_REGISTERED"  # a task frame before REGISTER_*
    WRONG_ROLE = "WRONG_ROLE"  # a client frame from a worker or the reverse
    ALREADY_REGISTERED = "ALREADY_REGISTERED"  # a second REGISTER_* on one connection
    UNKNOWN_TASK = "UNKNOWN_TASK"  # a taskId the worker does not hold
    UNKNOWN_TOPIC = "UNKNOWN_TOPIC"  # a topic that does not exist
    BAD_EMAIL = "BAD_EMAIL"  # a malformed e-mail address
    UNAUTHORIZED = "UNAUTHORIZED"  # missing or wrong credentials
    RATE_LIMITED = "RATE_LIMITED"  # a configured limit was exceeded


class ProtocolError(Exception):
    """A frame the broker refuses; becomes an ERROR frame on the wire."""

    def __init__(self, code: ErrorCode, message: str, ref: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref: dict[str, Any] = dict(ref or {})


# --- encoding ----------------------------------------------------------------


# orjson encodes and decodes several times faster than the json module; the
# json module stays as the reference for what orjson refuses (see _decode_slowly).


def encode(frame: Mapping[str, Any]) -> str:
    """Serialise a frame compactly, keeping non-ASCII text as it is."""
    return orjson.dumps(frame).decode()


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _decode_slowly(text: str) -> Any:
    """What the json module makes of a frame orjson refused.

    orjson refuses some text the json module reads: escaped lone surrogates
    (refused below with their own message) and numbers beyond a double
    (``1e999``, which then fails validation as not finite). Everything else it
    refuses is not JSON for either.
    """
    try:
        return json.loads(text, parse_constant=_not_json)  # Python would accept NaN and Infinity
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None


def decode(text: str) -> dict[str, Any]:
    """Parse raw frame text into a JSON object with a string ``type``."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        obj = _decode_slowly(text)
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    # A UTF-8 frame holds no lone surrogate and no raw U+0000 in a string, but
    # JSON escapes can: such a string could not be stored, nor echoed back.
    if "\\u" in text and not _plain_strings(obj):
        raise ProtocolError(ErrorCode.BAD_FRAME, "strings must not hold U+0000 or lone surrogates (\\u0000, \\ud800)")
    frame_type = obj.get("type")
    if not isinstance(frame_type, str) or not frame_type:
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame needs a string field 'type'", ref_of(obj))
    return obj


def _plain_strings(obj: Any) -> bool:
    """Whether every string (key or value) in a decoded JSON value is free of U+0000 and lone surrogates."""
    pending = [obj]
    while pending:  # not recursive: the value may be nested as deep as json.loads allows
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value or _SURROGATE.search(value):
                return False
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return True


_SURROGATE = re.compile("[\ud800-\udfff]")

REF_FIELDS = ("type", "messageId", "taskId", "topic")


def ref_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ref`` of an ERROR: the offending frame's type and identifying fields."""
    ref: dict[str, Any] = {}
    for name in REF_FIELDS:
        value = obj.get(name)
        if isinstance(value, str):
            # Repeat identifiers, but never echo a huge string back.
            ref[name] = value if len(value) <= MAX_ID_LENGTH else value[:MAX_ID_LENGTH] + "..."
        elif isinstance(value, int) and not isinstance(value, bool):
            ref[name] = value
        elif isinstance(value, float) and math.isfinite(value):
            ref[name] = value  # 1e999 parses as infinity, which JSON cannot say
    return ref


def error_frame(code: ErrorCode, message: str, ref: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "ERROR", "code": str(code), "message": message, "ref": dict(ref or {})}


# --- field validators (shared with subscriptions.protocol) -------------------


def _bad(obj: Mapping[str, Any], message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, message, ref_of(obj))


def required_str(obj: Mapping[str, Any], name: str, *, max_length: int | None = None, allow_empty: bool = True) -> str:
    """A required string field."""
    value = obj.get(name)
    if not isinstance(value, str):
        raise _bad(obj, f"{obj['type']} needs a string field '{name}'")
    if not allow_empty and not value:
        raise _bad(obj, f"'{name}' must not be empty")
    if max_length is not None and len(value) > max_length:
        raise _bad(obj, f"'{name}' is longer than {max_length} characters")
    return value


def optional_str(
    obj: Mapping[str, Any], name: str, *, max_length: int | None = None, allow_empty: bool = False
) -> str | None:
    """An optional string field; ``null`` counts as absent."""
    if obj.get(name) is None:
        return None
    return required_str(obj, name, max_length=max_length, allow_empty=allow_empty)


def optional_int(obj: Mapping[str, Any], name: str, *, minimum: int, maximum: int) -> int | None:
    """An optional integer field within bounds; ``null`` counts as absent."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(obj, f"'{name}' must be an integer")
    if not minimum <= value <= maximum:
        raise _bad(obj, f"'{name}' must be between {minimum} and {maximum}")
    return value


def optional_seconds(obj: Mapping[str, Any], name: str, *, maximum: float) -> float | None:
    """An optional positive number of seconds; ``null`` counts as absent."""
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(obj, f"'{name}' must be a number of seconds")
    if not 0 < value <= maximum:
        raise _bad(obj, f"'{name}' must be above 0 and at most {maximum:g} seconds")
    return float(value)


# --- task frames (peer -> broker) --------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterClient:
    client_id: str | None  # REGISTER_CLIENT.clientId: resume results across reconnects


@dataclass(frozen=True, slots=True)
class RegisterWorker:
    concurrency: int  # how many tasks the worker may hold at once


@dataclass(frozen=True, slots=True)
class RequestTask:
    message_id: str
    data: str
    timeout: float | None  # lease in seconds
    max_attempts: int | None


@dataclass(frozen=True, slots=True)
class ResponseTask:
    task_id: str
    data: str


@dataclass(frozen=True, slots=True)
class FailTask:
    task_id: str
    error: str


@dataclass(frozen=True, slots=True)
class TouchTask:
    task_id: str


@dataclass(frozen=True, slots=True)
class Status:
    pass


def parse_register_client(obj: Mapping[str, Any]) -> RegisterClient:
    return RegisterClient(client_id=optional_str(obj, "clientId", max_length=MAX_ID_LENGTH))


def parse_register_worker(obj: Mapping[str, Any]) -> RegisterWorker:
    concurrency = optional_int(obj, "concurrency", minimum=1, maximum=MAX_CONCURRENCY)
    return RegisterWorker(concurrency=concurrency or 1)


def parse_request_task(obj: Mapping[str, Any]) -> RequestTask:
    return RequestTask(
        message_id=required_str(obj, "messageId", max_length=MAX_ID_LENGTH, allow_empty=False),
        data=required_str(obj, "data"),
        timeout=optional_seconds(obj, "timeout", maximum=MAX_TIMEOUT_SECONDS),
        max_attempts=optional_int(obj, "maxAttempts", minimum=1, maximum=MAX_ATTEMPTS_LIMIT),
    )


def parse_task_id(obj: Mapping[str, Any]) -> str:
    return required_str(obj, "taskId", max_length=MAX_ID_LENGTH, allow_empty=False)


def parse_response_task(obj: Mapping[str, Any]) -> ResponseTask:
    return ResponseTask(task_id=parse_task_id(obj), data=required_str(obj, "data"))


def parse_fail_task(obj: Mapping[str, Any]) -> FailTask:
    # The reason is free text; a worker that sends none still fails the task.
    return FailTask(task_id=parse_task_id(obj), error=optional_str(obj, "data", allow_empty=True) or "")


def parse_touch_task(obj: Mapping[str, Any]) -> TouchTask:
    return TouchTask(task_id=parse_task_id(obj))


def parse_status(obj: Mapping[str, Any]) -> Status:
    return Status()


Parser = Callable[[Mapping[str, Any]], Any]

TASK_PARSERS: dict[str, Parser] = {
    "REGISTER_CLIENT": parse_register_client,
    "REGISTER_WORKER": parse_register_worker,
    "REQUEST_TASK": parse_request_task,
    "RESPONSE_TASK": parse_response_task,
    "FAIL_TASK": parse_fail_task,
    "TOUCH_TASK": parse_touch_task,
    "STATUS": parse_status,
}


def parse(obj: Mapping[str, Any], parsers: Mapping[str, Parser]) -> Any:
    """Turn a decoded frame into its typed value, using the parser for its type."""
    parser = parsers.get(obj["type"])
    if parser is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {obj['type'][:64]!r}", ref_of(obj))
    return parser(obj)


# --- frames the broker sends ---------------------------------------------------


def request_task_frame(task_id: str, data: str) -> dict[str, Any]:
    return {"type": "REQUEST_TASK", "taskId": task_id, "data": data}


def response_task_frame(message_id: str, data: str) -> dict[str, Any]:
    return {"type": "RESPONSE_TASK", "messageId": message_id, "data": data}


def task_failed_frame(message_id: str, error: str) -> dict[str, Any]:
    return {"type": "TASK_FAILED", "messageId": message_id, "data": error}


def status_frame(counts: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": "STATUS", "data": dict(counts)}
