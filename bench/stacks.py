"""Server processes for ``make bench``: TurtleMQ stacks on daphne or uvicorn, and the references' servers.

A :class:`Stack` is TurtleMQ on one database and channel layer: the embedded
default (SQLite, in-memory layer, one process) or PostgreSQL + Redis with two
processes, clients (and the publisher) on the first and workers on the second.
Every process listens on a free loopback port and logs to a file in the run's
working directory. The brokers run as in production (DEBUG off), with access
control off so that the reference harness's peers, which present no key, are
served alike.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
POSTGRES_ADMIN_DSN = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
MAX_FRAME_BYTES = 1024 * 1024  # the broker's default (PROTOCOL.md, Transport)
SERVERS = ("daphne", "uvicorn")


class Unavailable(Exception):
    """A service or library that a step needs is missing; the step is skipped with this reason."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_open_files_limit() -> None:
    """Allow as many open files as the hard limit: the idle-connections step holds thousands."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), 1).close()
    except OSError:
        return False
    return True


def asgi_argv(server: str, port: int, application: str) -> list[str]:
    """The command serving ``application`` on ``server`` (each with its own defaults otherwise)."""
    if server == "daphne":
        return [
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
            "--websocket-max-message-size", str(MAX_FRAME_BYTES), application,
        ]  # fmt: skip
    if server == "uvicorn":
        return [
            sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            # What --ws auto picks with websockets installed; the legacy "websockets" one is deprecated.
            "--ws", "websockets-sansio", "--ws-max-size", str(MAX_FRAME_BYTES), "--log-level", "warning", application,
        ]  # fmt: skip
    raise ValueError(f"unknown ASGI server {server!r}")


@dataclass
class Server:
    """One server process on a loopback port."""

    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    cwd: Path = REPO
    health_path: str | None = None  # an HTTP path answering 200 once ready; None: wait for the port
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=raise_open_files_limit,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[2]} exited with {self.process.returncode}; see {self.log_path}")
            if self._ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.argv[2]} on port {self.port} not ready after {timeout:g} s; see {self.log_path}")

    def _ready(self) -> bool:
        if self.health_path is None:
            return port_open(self.port)
        url = f"http://127.0.0.1:{self.port}{self.health_path}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
        return False

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


@dataclass
class Stack:
    """TurtleMQ on one database and channel layer, served by one or more processes."""

    label: str
    server: str
    env: dict[str, str]
    servers: list[Server]
    cleanup: list = field(default_factory=list)

    @property
    def client_url(self) -> str:
        return self.servers[0].url

    @property
    def worker_url(self) -> str:
        return self.servers[-1].url

    @property
    def pids(self) -> list[int]:
        return [server.pid for server in self.servers]

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait_ready()
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for step in self.cleanup:
            with contextlib.suppress(Exception):
                step()


def broker_env(extra: dict[str, str]) -> dict[str, str]:
    """A production-like environment: DEBUG off, access control off, no inherited database or layer."""
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}}
    env |= {
        "DJANGO_SETTINGS_MODULE": "turtlemq_site.settings",
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "TURTLEMQ_AUTH": "0",
        "TURTLEMQ_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    return env | extra


def _migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"migrate failed:\n{done.stdout}{done.stderr}")


def embedded_stack(workdir: Path, server: str) -> Stack:
    """SQLite and the in-memory layer in one process (the default with nothing configured)."""
    template = workdir / "migrated.sqlite3"
    if not template.exists():
        _migrate(broker_env({"TURTLEMQ_SQLITE_PATH": str(template)}))
        # Fold the write-ahead log into the file, so that a copy of the file is complete.
        with contextlib.closing(sqlite3.connect(template)) as database:
            database.execute("PRAGMA journal_mode=DELETE")
    path = workdir / f"embedded-{server}.sqlite3"
    shutil.copyfile(template, path)
    env = broker_env({"TURTLEMQ_SQLITE_PATH": str(path)})
    port = free_port()
    process = Server(
        asgi_argv(server, port, "turtlemq_site.asgi:application"),
        env, port, workdir / f"embedded-{server}.log", health_path="/healthz",
    )  # fmt: skip
    return Stack(f"embedded (SQLite, in-memory layer, 1 process), {server}", server, env, [process])


def postgres_redis_stack(workdir: Path, server: str, processes: int = 2) -> Stack:
    """A fresh PostgreSQL database and a Redis prefix shared by ``processes`` broker processes."""
    try:
        import psycopg
        import redis
    except ImportError as exc:
        raise Unavailable(f"{exc.name} is not installed") from exc
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        raise Unavailable(f"Redis at {REDIS_URL} is not reachable ({exc})") from exc
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        raise Unavailable(f"PostgreSQL at {POSTGRES_ADMIN_DSN} is not reachable") from exc
    name = f"turtlemq_bench_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    database_url = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    env = broker_env({"DATABASE_URL": database_url, "REDIS_URL": REDIS_URL, "TURTLEMQ_REDIS_PREFIX": name})
    try:
        _migrate(env)
    except Exception:
        drop()
        raise
    ports = [free_port() for _ in range(processes)]
    application = "turtlemq_site.asgi:application"
    servers = [
        Server(asgi_argv(server, port, application), env, port, workdir / f"pg-{i}.log", health_path="/healthz")
        for i, port in enumerate(ports)
    ]
    label = f"PostgreSQL + Redis, {processes} processes, {server}"
    return Stack(label, server, env, servers, cleanup=[drop])


def ws_relay_server(workdir: Path) -> Server:
    """The bare ``websockets`` relay: the floor."""
    port = free_port()
    argv = [sys.executable, str(SHARED_BENCH / "ws_relay.py"), "--port", str(port), "--max-seconds", "900"]
    return Server(argv, dict(os.environ), port, workdir / "ws_relay.log", cwd=SHARED_BENCH)


def channels_relay_server(workdir: Path, server: str) -> Server:
    """The bare Channels relay, lean and direct (no thread hop per message, tasks routed in-process)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DJANGO_SETTINGS_MODULE", "PYTHONPATH"}}
    env |= {"DJANGO_SETTINGS_MODULE": "channels_relay.settings", "RELAY_LEAN": "1", "RELAY_DIRECT": "1"}
    argv = asgi_argv(server, port, "channels_relay.asgi:application")
    return Server(argv, env, port, workdir / f"channels_relay-{server}.log", cwd=SHARED_BENCH)
