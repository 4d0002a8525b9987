"""Typed exceptions: one class per ERROR code of the wire protocol, and the client-side failures.

Every ERROR frame from the broker becomes an instance of the :class:`BrokerError`
subclass named after its code (``UNKNOWN_TOPIC`` -> :class:`UnknownTopic`), so a
caller can catch exactly what it can handle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class TurtleMQError(Exception):
    """Base of every exception this package raises on purpose."""


class BrokerError(TurtleMQError):
    """The broker refused a frame with an ERROR frame."""

    code: ClassVar[str] = ""

    def __init__(self, message: str, ref: Mapping[str, Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref: dict[str, Any] = dict(ref or {})
        if code is not None:
            # An ERROR code this version of the client does not know yet.
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadJson(BrokerError):
    code = "BAD_JSON"


class BadFrame(BrokerError):
    code = "BAD_FRAME"


class UnknownType(BrokerError):
    code = "UNKNOWN_TYPE"


class NotRegistered(BrokerError):
    code = "NOT_REGISTERED"


class WrongRole(BrokerError):
    code = "WRONG_ROLE"


class AlreadyRegistered(BrokerError):
    code = "ALREADY_REGISTERED"


class UnknownTask(BrokerError):
    code = "UNKNOWN_TASK"


class UnknownTopic(BrokerError):
    code = "UNKNOWN_TOPIC"


class BadEmail(BrokerError):
    code = "BAD_EMAIL"


class Unauthorized(BrokerError):
    code = "UNAUTHORIZED"


class RateLimited(BrokerError):
    code = "RATE_LIMITED"


ERROR_CLASSES: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        BadJson,
        BadFrame,
        UnknownType,
        NotRegistered,
        WrongRole,
        AlreadyRegistered,
        UnknownTask,
        UnknownTopic,
        BadEmail,
        Unauthorized,
        RateLimited,
    )
}


def error_from_frame(frame: Mapping[str, Any]) -> BrokerError:
    """The typed exception for an ERROR frame (a plain :class:`BrokerError` for an unknown code)."""
    code = str(frame.get("code", ""))
    message = str(frame.get("message", ""))
    ref = frame.get("ref")
    ref = ref if isinstance(ref, Mapping) else {}
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return BrokerError(message, ref, code=code)
    return cls(message, ref)


class TaskFailed(TurtleMQError):
    """A submitted task ran out of attempts: the broker answered TASK_FAILED."""

    def __init__(self, message_id: str, reason: str) -> None:
        super().__init__(reason)
        self.message_id = message_id
        self.reason = reason

    def __str__(self) -> str:
        return f"task {self.message_id} failed: {self.reason}"


class TaskError(TurtleMQError):
    """Raise from a worker's handler to fail the task with exactly this text (other exceptions add their type)."""


class ConnectionLost(TurtleMQError):
    """The connection closed before the broker answered, or could not be (re)established in time."""


class FrameTooLarge(TurtleMQError, ValueError):
    """A frame is larger than the broker accepts; sending it would only make the broker close the connection."""
