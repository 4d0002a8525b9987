"""The client package's pure parts: no broker, no network."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turtlemq_client import errors
from turtlemq_client.cli import parse_args
from turtlemq_client.connection import Backoff, url_with_token
from turtlemq_client.menu import valid_email
from turtlemq_client.subscriber import is_pattern, topic_matches
from turtlemq_client.worker import failure_text


def test_the_package_imports_without_django_and_needs_only_websockets():
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import turtlemq_client, turtlemq_client.cli, turtlemq_client.menu, turtlemq_client.__main__\n"
        "top = {name.partition('.')[0] for name in set(sys.modules) - before}\n"
        "print(sorted(top - set(sys.stdlib_module_names) - {'turtlemq_client', 'websockets'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("news.sports", "news.sports", True),
        ("news.sports", "news.weather", False),
        ("news.*", "news.sports", True),
        ("news.*", "news", False),
        ("news.*", "news.sports.tennis", False),
        ("news.#", "news", True),
        ("news.#", "news.sports.tennis", True),
        ("#.tennis", "news.sports.tennis", True),
        ("#", "anything.at.all", True),
        ("*.sports.#", "news.sports", True),
        ("*.sports.#", "sports", False),
        ("React", "react", False),
    ],
)
def test_patterns_match_topics_as_the_broker_does(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


def test_only_names_with_star_or_hash_words_are_patterns():
    assert is_pattern("news.*") and is_pattern("#")
    assert not is_pattern("news.sports") and not is_pattern("React")


def test_every_error_code_of_the_protocol_has_its_own_exception_class():
    codes = [
        "BAD_JSON", "BAD_FRAME", "UNKNOWN_TYPE", "NOT_REGISTERED", "WRONG_ROLE", "ALREADY_REGISTERED",
        "UNKNOWN_TASK", "UNKNOWN_TOPIC", "BAD_EMAIL", "UNAUTHORIZED", "RATE_LIMITED",
    ]  # fmt: skip
    for code in codes:
        frame = {"type": "ERROR", "code": code, "message": "no", "ref": {"type": "PUBLISH", "topic": "x"}}
        error = errors.error_from_frame(frame)
        assert type(error) is errors.ERROR_CLASSES[code]
        assert isinstance(error, errors.BrokerError)
        assert (error.code, error.message, error.ref) == (code, "no", {"type": "PUBLISH", "topic": "x"})
    assert len({errors.ERROR_CLASSES[code] for code in codes}) == len(codes)


def test_an_error_code_unknown_to_the_client_is_still_a_broker_error_with_its_code():
    error = errors.error_from_frame({"type": "ERROR", "code": "NEW_CODE", "message": "later", "ref": None})
    assert type(error) is errors.BrokerError
    assert (error.code, error.ref, str(error)) == ("NEW_CODE", {}, "NEW_CODE: later")


def test_the_access_key_travels_as_the_token_query_parameter():
    assert url_with_token("ws://h:1/", None) == "ws://h:1/"
    assert url_with_token("ws://h:1/", "k e+y") == "ws://h:1/?token=k+e%2By"
    assert url_with_token("ws://h:1/ws/?a=1&token=old", "new") == "ws://h:1/ws/?a=1&token=new"


def test_backoff_grows_exponentially_up_to_its_maximum():
    backoff = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert backoff.delay(10_000) == 2.0
    jittered = Backoff(initial=1.0, maximum=1.0, jitter=0.2)
    assert all(0.8 <= jittered.delay(0) <= 1.2 for _ in range(100))


@pytest.mark.parametrize("address", ["me@example.com", "first.last+tag@mail.example.co.uk", "a_b@x-y.org"])
def test_the_menu_accepts_ordinary_email_addresses(address):
    assert valid_email(address)


@pytest.mark.parametrize(
    "address", ["", "me", "me@", "@example.com", "me@example", "me @example.com", "me@exa mple.com", "a@b@c.com"]
)
def test_the_menu_refuses_malformed_email_addresses(address):
    assert not valid_email(address)


def test_a_failing_handler_is_reported_with_its_exception_type_unless_it_raises_task_error():
    assert failure_text(ValueError("boom")) == "ValueError: boom"
    assert failure_text(KeyError()) == "KeyError"
    assert failure_text(errors.TaskError("exit 3: no such file")) == "exit 3: no such file"


def test_the_command_line_takes_url_and_token_from_options_then_environment(monkeypatch):
    monkeypatch.delenv("TURTLEMQ_URL", raising=False)
    monkeypatch.delenv("TURTLEMQ_TOKEN", raising=False)
    args = parse_args(["status"])
    assert (args.url, args.token) == ("ws://127.0.0.1:8000/", None)
    monkeypatch.setenv("TURTLEMQ_URL", "ws://env:1/")
    monkeypatch.setenv("TURTLEMQ_TOKEN", "envkey")
    assert (parse_args(["topics"]).url, parse_args(["topics"]).token) == ("ws://env:1/", "envkey")
    args = parse_args(["--url", "ws://before:2/", "submit", "--token", "after", "x"])
    assert (args.url, args.token, args.data) == ("ws://before:2/", "after", ["x"])
