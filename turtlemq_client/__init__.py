"""TurtleMQ's Python client: submit tasks, work on them, follow and publish topics.

Importable without Django; its only dependency is ``websockets``.

    async with Client("ws://127.0.0.1:8000/") as client:
        print(await client.submit("hello"))
"""

from .client import Client
from .connection import DEFAULT_URL, Backoff, Connection
from .errors import (
    AlreadyRegistered,
    BadEmail,
    BadFrame,
    BadJson,
    BrokerError,
    ConnectionLost,
    FrameTooLarge,
    NotRegistered,
    RateLimited,
    TaskError,
    TaskFailed,
    TurtleMQError,
    Unauthorized,
    UnknownTask,
    UnknownTopic,
    UnknownType,
    WrongRole,
)
from .shortcuts import list_topics, publish, status
from .subscriber import Message, Subscriber
from .worker import Worker

__all__ = [
    "DEFAULT_URL",
    "AlreadyRegistered",
    "Backoff",
    "BadEmail",
    "BadFrame",
    "BadJson",
    "BrokerError",
    "Client",
    "Connection",
    "ConnectionLost",
    "FrameTooLarge",
    "Message",
    "NotRegistered",
    "RateLimited",
    "Subscriber",
    "TaskError",
    "TaskFailed",
    "TurtleMQError",
    "Unauthorized",
    "UnknownTask",
    "UnknownTopic",
    "UnknownType",
    "Worker",
    "WrongRole",
    "list_topics",
    "publish",
    "status",
]
