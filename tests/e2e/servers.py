"""Real broker processes for end-to-end tests.

A :class:`Stack` is a database, a channel layer and one or more daphne
processes serving ``turtlemq_site.asgi``: the embedded default (SQLite file,
in-memory layer, one process) or PostgreSQL + Redis with two processes, where
clients talk to one and workers to the other.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_ADMIN_DSN = os.environ.get("TURTLEMQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TURTLEMQ_TEST_REDIS", "redis://127.0.0.1:6379/0")

# WebSocket keepalive of daphne, from the same variables as `make run`:
# seconds idle before a ping, and seconds without a pong before the broker
# drops the connection (daphne's defaults). Tests of half-open connections
# lower them with the stack_env marker.
PING_DEFAULTS = {"TURTLEMQ_PING_INTERVAL": "20", "TURTLEMQ_PING_TIMEOUT": "30"}

# Quick failure detection so that tests about dead processes finish fast.
FAST_HOUSEKEEPING = {
    "TURTLEMQ_TICK": "0.2",
    "TURTLEMQ_PROCESS_DEAD_AFTER": "3",
    "TURTLEMQ_RETRY_BACKOFF": "0.2",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_missing(what: str) -> None:
    """Skip on a developer machine without the service; fail under CI, where it must exist."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true but is not reachable")
    pytest.skip(f"{what} is not reachable")


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    env["DJANGO_SETTINGS_MODULE"] = "turtlemq_site.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(FAST_HOUSEKEEPING)
    return env


@dataclass
class BrokerServer:
    """One daphne process serving the broker (or uvicorn, with ``server="uvicorn"``)."""

    env: dict[str, str]
    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    server: str = "daphne"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self, timeout: float = 20.0) -> BrokerServer:
        self.launch()
        return self.wait_healthy(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_healthy`)."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", *self._server_args(), "turtlemq_site.asgi:application"],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if log is not subprocess.DEVNULL:
            log.close()  # the child has its own copy

    def _server_args(self) -> list[str]:
        max_frame = self.env.get("TURTLEMQ_MAX_FRAME_BYTES", str(1024 * 1024))
        ping_interval = self.env.get("TURTLEMQ_PING_INTERVAL", PING_DEFAULTS["TURTLEMQ_PING_INTERVAL"])
        ping_timeout = self.env.get("TURTLEMQ_PING_TIMEOUT", PING_DEFAULTS["TURTLEMQ_PING_TIMEOUT"])
        if self.server == "uvicorn":
            return [
                "uvicorn", "--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "on",
                "--ws-max-size", max_frame, "--ws-ping-interval", ping_interval, "--ws-ping-timeout", ping_timeout,
            ]  # fmt: skip
        return [
            "daphne", "-b", "127.0.0.1", "-p", str(self.port), "--websocket-max-message-size", max_frame,
            "--ping-interval", ping_interval, "--ping-timeout", ping_timeout,
        ]  # fmt: skip

    def wait_healthy(self, timeout: float = 20.0) -> BrokerServer:
        """Wait until ``/healthz`` answers 200; fail if the process exits first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"broker exited with {self.process.returncode}; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"broker on port {self.port} did not become healthy; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        self.send_signal(sig)
        self.wait_stopped(timeout)

    def send_signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Wait for the process to end; kill it if it does not within ``timeout``."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def kill(self) -> None:
        """Die without cleaning up, as a crashed process would."""
        self.stop(signal.SIGKILL)

    def restart(self) -> BrokerServer:
        """Start again on the same port, as an operator restarting the service."""
        self.stop()
        return self.start()


@dataclass
class Stack:
    """A database + channel layer and the broker processes that share them."""

    name: str
    env: dict[str, str]
    servers: list[BrokerServer]

    @property
    def client_url(self) -> str:
        return self.servers[0].url

    @property
    def worker_url(self) -> str:
        return self.servers[-1].url

    def manage(self, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``manage.py`` against this stack's database."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO_ROOT,
            env=self.env | (extra_env or {}),
            check=True,
            capture_output=True,
            text=True,
        )

    def start(self) -> None:
        """Start every broker process (side by side) and wait until all are healthy."""
        for server in self.servers:
            server.launch()
        for server in self.servers:
            server.wait_healthy()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop every broker process with ``sig``; all of them receive it before any is waited for."""
        for server in self.servers:
            server.send_signal(sig)
        for server in self.servers:
            server.wait_stopped()

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop every broker process with ``sig``, then start them all again on their ports.

        All of them are down at once, as in an outage or a redeploy.
        """
        self.stop(sig)
        self.start()


# --- migrated databases, made once per test session -------------------------
# Migrating takes about as long as starting a broker; each stack copies the
# result instead (a file for SQLite, a template database for PostgreSQL).


def _postgres_url(database: str) -> str:
    return POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{database}"


def _migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"migrate failed with {done.returncode}:\n{done.stdout}{done.stderr}")


@functools.cache
def _migrated_sqlite() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="turtlemq-e2e-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    path = directory / "migrated.sqlite3"
    _migrate(_base_env() | {"TURTLEMQ_SQLITE_PATH": str(path)})
    # Fold the write-ahead log into the file, so that copying the file copies everything.
    with contextlib.closing(sqlite3.connect(path)) as database:
        database.execute("PRAGMA journal_mode=DELETE")
    return path


@functools.cache
def _migrated_postgres_template() -> str:
    import psycopg

    name = f"turtlemq_e2e_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    atexit.register(_drop_postgres_database, name)
    _migrate(_base_env() | {"DATABASE_URL": _postgres_url(name)})
    return name


def _drop_postgres_database(name: str) -> None:
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def embedded_stack(tmp_path: Path, extra_env: dict[str, str] | None = None, server: str = "daphne") -> Iterator[Stack]:
    """SQLite and the in-memory layer in one broker process: the default with nothing set."""
    env = _base_env() | {"TURTLEMQ_SQLITE_PATH": str(tmp_path / "broker.sqlite3")} | (extra_env or {})
    shutil.copyfile(_migrated_sqlite(), tmp_path / "broker.sqlite3")
    stack = Stack("embedded", env, [BrokerServer(env, log_path=tmp_path / "broker.log", server=server)])
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


class ServiceMissing(RuntimeError):
    """PostgreSQL or Redis is not reachable."""


# The PostgreSQL stacks run as in production: DEBUG off (Django logs no queries, so task
# batches take broker.postgres's way, as they do in production), access control off unless
# a test turns it on (as DEBUG would have it).
PRODUCTION_LIKE = {"DEBUG": "0", "SECRET_KEY": "turtlemq-e2e-not-secret", "TURTLEMQ_AUTH": "0"}


@contextlib.contextmanager
def postgres_redis_env(extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """Broker environment on a fresh, migrated PostgreSQL database and a Redis prefix of its own.

    The database is dropped afterwards. Raises :class:`ServiceMissing` when
    PostgreSQL or Redis is not reachable.
    """
    import psycopg
    import redis

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        raise ServiceMissing(f"PostgreSQL ({POSTGRES_ADMIN_DSN})") from None
    with contextlib.closing(admin):
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
        except redis.RedisError:
            raise ServiceMissing(f"Redis ({REDIS_URL})") from None
        name = f"turtlemq_e2e_{uuid.uuid4().hex[:12]}"
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_migrated_postgres_template()}"')
        env = _base_env() | PRODUCTION_LIKE
        env |= {"DATABASE_URL": _postgres_url(name), "REDIS_URL": REDIS_URL, "TURTLEMQ_REDIS_PREFIX": name}
        try:
            yield env | (extra_env or {})
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_redis_stack(tmp_path: Path, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """A fresh PostgreSQL database and a Redis prefix shared by two broker processes."""
    with contextlib.ExitStack() as cleanup:
        try:
            env = cleanup.enter_context(postgres_redis_env(extra_env))
        except ServiceMissing as exc:
            service_missing(str(exc))
        stack = Stack(
            "postgres_redis",
            env,
            [
                BrokerServer(env, log_path=tmp_path / "broker-clients.log"),
                BrokerServer(env, log_path=tmp_path / "broker-workers.log"),
            ],
        )
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()
