"""Settings for TurtleMQ, read from the environment.

With nothing set, TurtleMQ runs embedded: SQLite (WAL) and the in-memory
channel layer in one process, with development-only defaults. Production
parts are chosen by environment variables:

* ``DATABASE_URL`` (e.g. ``postgres://user@127.0.0.1:5432/turtlemq``) selects
  PostgreSQL; ``REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/0``) selects the
  channels-redis layer, so that several broker processes share the work.
* ``SECRET_KEY``, ``DEBUG``, ``ALLOWED_HOSTS`` as in any Django project. With
  ``DEBUG`` off, start-up refuses to go on without ``SECRET_KEY``.
* ``TURTLEMQ_*`` tune the broker (see the bottom of this file).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean environment variable such as ``1``/``true``/``no``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


# --- Security -------------------------------------------------------------

DEBUG = env_bool("DEBUG", True)
ALLOWED_HOSTS = [
    host.strip() for host in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if host.strip()
]
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        # Refuse to serve production traffic without a key of its own.
        raise ImproperlyConfigured("DEBUG is off but SECRET_KEY is not set: set SECRET_KEY in the environment.")
    # Development only: a key derived from where this checkout lives, so that
    # every broker process of one checkout signs admin sessions alike.
    SECRET_KEY = hashlib.sha256(f"turtlemq development {BASE_DIR}".encode()).hexdigest()

# --- Applications ---------------------------------------------------------

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "broker",
    "subscriptions",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS and JavaScript from any ASGI server (daphne and
    # uvicorn serve no static files themselves).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "turtlemq_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = None
ASGI_APPLICATION = "turtlemq_site.asgi.application"

# --- Database: the source of truth ----------------------------------------

SQLITE_PATH = os.environ.get("TURTLEMQ_SQLITE_PATH", str(BASE_DIR / "db.sqlite3"))

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=600)}
    # Server-side prepared statements for what runs more than this many times on
    # a connection: the task path's hand-written statements (broker.sql), which
    # PostgreSQL would otherwise parse and plan for every batch (except those
    # that look for the oldest queued tasks: see broker.sql). Django leaves
    # them off by default (they need pgbouncer 1.21+ in transaction pooling);
    # "off" does too.
    _prepare = os.environ.get("TURTLEMQ_PG_PREPARE_THRESHOLD", "5").strip().lower()
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        None if _prepare in ("off", "none", "") else int(_prepare)
    )
    # Test runs create their own database; a per-process name lets several
    # runs share one PostgreSQL server without dropping each other's.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get("TURTLEMQ_TEST_DATABASE_NAME", f"test_turtlemq_{os.getpid()}"),
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            # Keep the connection: Django's default (0) closes it after every
            # database_sync_to_async call, and reopening SQLite (init_command,
            # a WAL checkpoint on the last close) cost most of a task's time.
            "CONN_MAX_AGE": None,
            "OPTIONS": {
                # IMMEDIATE takes the write lock when a transaction begins, so
                # read-then-write transactions never fail half way with
                # "database is locked"; WAL lets readers run beside the writer.
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # Test runs use a database file of their own (SQLite's default for
            # tests is in memory), so that they run the batches on the event
            # loop as served brokers do (broker.embedded needs a file).
            "TEST": {
                "NAME": os.environ.get("TURTLEMQ_TEST_DATABASE_NAME")
                or str(Path(tempfile.gettempdir()) / f"turtlemq-test-{os.getpid()}.sqlite3"),
            },
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Channel layer: the doorbell ------------------------------------------

if os.environ.get("REDIS_URL"):
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times reads out after 5 s by default, exactly the
                # 5 s that channels-redis blocks in BZPOPMIN on an idle channel:
                # an idle consumer would crash with TimeoutError. Read longer.
                "hosts": [{"address": os.environ["REDIS_URL"], "socket_timeout": 30}],
                # A separate prefix lets several TurtleMQ installations (or
                # test runs) share one Redis without hearing each other.
                "prefix": os.environ.get("TURTLEMQ_REDIS_PREFIX", "turtlemq"),
                "capacity": 10_000,
                "expiry": 60,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            # A client may have thousands of results in flight; the default
            # capacity of 100 would drop their doorbells.
            "CONFIG": {"capacity": 10_000, "expiry": 60},
        }
    }

# --- Internationalisation, static files -----------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Set STATIC_ROOT only to run collectstatic for a separate web server; the
# broker itself serves straight from the apps' static folders.
STATIC_ROOT = os.environ.get("STATIC_ROOT") or None
WHITENOISE_USE_FINDERS = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "turtlemq": {"handlers": ["console"], "level": os.environ.get("TURTLEMQ_LOG_LEVEL", "INFO")},
    },
}

# --- TurtleMQ broker ------------------------------------------------------

# Largest accepted WebSocket frame; larger ones close the connection with 1009.
TURTLEMQ_MAX_FRAME_BYTES = env_int("TURTLEMQ_MAX_FRAME_BYTES", 1024 * 1024)
# How often a task may fail (FAIL_TASK) before its client gets TASK_FAILED.
TURTLEMQ_MAX_ATTEMPTS = env_int("TURTLEMQ_MAX_ATTEMPTS", 3)
# Delay before the first retry of a failed task; it doubles with each failure.
TURTLEMQ_RETRY_BACKOFF = env_float("TURTLEMQ_RETRY_BACKOFF", 1.0)
# How long a broker process may stay silent (it beats its heartbeat every
# TURTLEMQ_TICK) before the others take back what its workers hold.
TURTLEMQ_PROCESS_DEAD_AFTER = env_float("TURTLEMQ_PROCESS_DEAD_AFTER", 15.0)
# How often each broker process looks for due retries and dead processes.
TURTLEMQ_TICK = env_float("TURTLEMQ_TICK", 1.0)
# Lease in seconds of a task whose REQUEST_TASK sets no timeout: a worker that
# holds it longer loses it (a failed attempt). Original TurtleMQ workers never
# send TOUCH_TASK, so the default is long enough for long jobs; a worker that
# vanished is found much sooner by the WebSocket ping. 0 turns leases off.
TURTLEMQ_DEFAULT_LEASE = env_float("TURTLEMQ_DEFAULT_LEASE", 3600.0)
# On SIGTERM, how long a broker process waits for its connections to close
# after it handed back their work, before it drops the rest and exits.
TURTLEMQ_SHUTDOWN_GRACE = env_float("TURTLEMQ_SHUTDOWN_GRACE", 5.0)
# SQLite only: run batches of task operations on the event loop, on a
# connection of its own, instead of handing each to the database thread
# (broker.embedded). Off: every batch takes the thread, as on PostgreSQL.
TURTLEMQ_SQLITE_ON_LOOP = env_bool("TURTLEMQ_SQLITE_ON_LOOP", True)
# PostgreSQL only: batches of task operations begin their transaction with
# their first statement, and send statements nobody reads ahead with the next
# one (broker.postgres). Off: every batch in Django's transactions.
TURTLEMQ_PG_PIPELINE = env_bool("TURTLEMQ_PG_PIPELINE", True)
# PostgreSQL only: batches of submissions (without clientId), completions and
# delivery marks run on the event loop, on a connection of its own, in one
# round trip (broker.pgloop). Off: every batch takes the database thread.
TURTLEMQ_PG_ON_LOOP = env_bool("TURTLEMQ_PG_ON_LOOP", True)

# --- Access control and limits (broker.access, broker.ratelimit) -------------

# Peers must present an access key (made in the admin or with
# create_access_key). Off on a developer's machine (DEBUG on), on in production.
TURTLEMQ_AUTH = env_bool("TURTLEMQ_AUTH", not DEBUG)
# Seconds a connection may stay open without presenting a key (auth on).
TURTLEMQ_AUTH_TIMEOUT = env_float("TURTLEMQ_AUTH_TIMEOUT", 10.0)
# Browser origins allowed to open a WebSocket (e.g. "https://app.example.com");
# empty: any. A handshake without an Origin header (a program) is always accepted.
TURTLEMQ_ALLOWED_ORIGINS = [
    origin.strip() for origin in os.environ.get("TURTLEMQ_ALLOWED_ORIGINS", "").split(",") if origin.strip()
]
# Unfinished tasks one client may have (per clientId, or per connection
# without one); REQUEST_TASK beyond it gets RATE_LIMITED. 0: no limit.
TURTLEMQ_MAX_CLIENT_IN_FLIGHT = env_int("TURTLEMQ_MAX_CLIENT_IN_FLIGHT", 10_000)
# Frames per second one connection may send on average, and in a burst;
# a frame beyond them gets RATE_LIMITED and is not processed. 0: no limit.
TURTLEMQ_MAX_FRAMES_PER_SECOND = env_float("TURTLEMQ_MAX_FRAMES_PER_SECOND", 5_000.0)
TURTLEMQ_FRAME_BURST = env_float("TURTLEMQ_FRAME_BURST", 2 * TURTLEMQ_MAX_FRAMES_PER_SECOND)

# --- Topics and e-mail notification (subscriptions) -------------------------

# SMTP comes from the environment only: no address or credential lives here.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 30.0)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "TurtleMQ <turtlemq@localhost>")
# The base URL people reach this server at; unsubscribe links point there.
TURTLEMQ_PUBLIC_URL = os.environ.get("TURTLEMQ_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
# How many of the newest messages a topic's content (SUBSCRIBED.data) holds.
TURTLEMQ_TOPIC_CONTENT_MESSAGES = env_int("TURTLEMQ_TOPIC_CONTENT_MESSAGES", 50)
# send_notifications: tries per e-mail, the first retry delay (doubling after
# each failure), and how long a claimed e-mail stays reserved for its sender.
TURTLEMQ_EMAIL_MAX_ATTEMPTS = env_int("TURTLEMQ_EMAIL_MAX_ATTEMPTS", 6)
TURTLEMQ_EMAIL_RETRY_BACKOFF = env_float("TURTLEMQ_EMAIL_RETRY_BACKOFF", 30.0)
TURTLEMQ_EMAIL_LEASE = env_float("TURTLEMQ_EMAIL_LEASE", 300.0)
