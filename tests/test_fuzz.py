"""Fuzzing the frame parser and the consumer with hypothesis (issue 5).

Random and malformed JSON, fields of the wrong kind, huge strings, odd Unicode
(escaped lone surrogates and U+0000, which valid UTF-8 text frames can only
carry inside JSON escapes) and deep nesting. The parser must answer every bad
frame with a :class:`ProtocolError`; the consumer must answer it with an
ERROR frame that a real socket can carry (UTF-8, strict JSON), keep the
connection open and lose no work it had accepted.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from channels.db import database_sync_to_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import protocol
from broker.consumers import PARSERS
from broker.models import Connection, Task
from broker.protocol import ErrorCode, ProtocolError
from tests.communicators import Peers

FRAME_TYPES = sorted(PARSERS)
FIELDS = ["data", "messageId", "taskId", "clientId", "concurrency", "timeout", "maxAttempts", "topic", "email"]
FIELDS += ["since", "token"]

# Text a UTF-8 frame can carry: any code point but the surrogates.
plain_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
# Strings that JSON escapes can smuggle in: lone surrogates and U+0000 among ordinary text.
odd_text = st.lists(st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028", "\ufeff", "a", "é", "😀", "."]), max_size=6)
odd_text = odd_text.map("".join)
huge_text = st.integers(300, 5000).map(lambda n: "x" * n)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | plain_text | odd_text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain_text, inner, max_size=3)
)
# Objects that look like frames: a known (or odd) type and known fields holding any kind of value.
frame_like = st.fixed_dictionaries(
    {"type": st.sampled_from(FRAME_TYPES) | plain_text | odd_text | scalars},
    optional={name: json_values | huge_text for name in FIELDS},
)


def as_text(value: Any) -> str:
    """JSON text as a peer would send it: escapes for what UTF-8 cannot hold, NaN and Infinity allowed."""
    return json.dumps(value, ensure_ascii=True)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# Raw frame texts: valid JSON of any shape, frame-like objects, broken JSON, deep nesting.
frame_texts = (
    json_values.map(as_text)
    | frame_like.map(as_text)
    | plain_text
    | frame_like.map(as_text).map(lambda text: text[: len(text) // 2])
    | st.sampled_from([deep(50), deep(5000), '{"type":' * 2000, "", " ", "null", "[]", '"type"', "NaN", "1e999"])
)


def assert_sendable(text: str) -> dict[str, Any]:
    """A frame the broker sends: encodable as UTF-8 and strict JSON (no NaN/Infinity), an object with a type."""
    text.encode("utf-8")  # raises on a lone surrogate, which a real socket could not carry

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    frame = json.loads(text, parse_constant=refuse)
    assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
    return frame


def storable(value: Any) -> bool:
    """Whether every string in ``value`` can be stored by SQLite and PostgreSQL alike."""
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return all(storable(k) and storable(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(storable(v) for v in value)
    return True


# --- the parser -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(frame_texts)
def test_the_parser_turns_any_text_into_a_frame_or_a_protocol_error_that_can_be_sent(text: str) -> None:
    obj: dict[str, Any] = {}
    try:
        obj = protocol.decode(text)
        frame = protocol.parse(obj, PARSERS)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)
        ref = exc.ref or (protocol.ref_of(obj) if obj else {})
        assert_sendable(protocol.encode(protocol.error_frame(exc.code, exc.message, ref)))
        return
    # An accepted frame holds nothing the database could refuse, and only finite numbers.
    fields = {name: getattr(frame, name) for name in getattr(frame, "__slots__", ())}
    assert storable(fields), fields
    assert all(math.isfinite(v) for v in fields.values() if isinstance(v, float)), fields


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (deep(100_000), ErrorCode.BAD_JSON),
        ('{"type":"REQUEST_TASK","messageId":"m","data":"\\ud800"}', ErrorCode.BAD_FRAME),
        ('{"type":"REQUEST_TASK","messageId":"m","data":"nul \\u0000"}', ErrorCode.BAD_FRAME),
        ('{"type":"\\udfff"}', ErrorCode.BAD_FRAME),
        ('{"type":"REQUEST_TASK","messageId":NaN,"data":""}', ErrorCode.BAD_JSON),
        ('{"type":"REQUEST_TASK","messageId":"m","data":"","timeout":Infinity}', ErrorCode.BAD_JSON),
        ('{"type":"REQUEST_TASK","messageId":1e999,"data":""}', ErrorCode.BAD_FRAME),
        ('{"type":"REQUEST_TASK","messageId":"' + "m" * 257 + '","data":""}', ErrorCode.BAD_FRAME),
    ],
    ids=["deep", "lone-surrogate", "nul", "surrogate-type", "nan-id", "infinite-timeout", "overflow", "long-id"],
)
def test_hostile_frames_get_the_documented_error_and_an_error_frame_that_can_be_sent(text: str, code: str) -> None:
    obj: dict[str, Any] = {}
    with pytest.raises(ProtocolError) as caught:
        obj = protocol.decode(text)
        protocol.parse(obj, PARSERS)
    assert caught.value.code == code
    ref = caught.value.ref or (protocol.ref_of(obj) if obj else {})
    assert_sendable(protocol.encode(protocol.error_frame(caught.value.code, caught.value.message, ref)))


def test_non_ascii_escaped_by_the_peer_is_accepted_as_the_same_text() -> None:
    text = json.dumps({"type": "REQUEST_TASK", "messageId": "é", "data": "日本 😀 \u2028"}, ensure_ascii=True)
    frame = protocol.parse(protocol.decode(text), PARSERS)
    assert (frame.message_id, frame.data) == ("é", "日本 😀 \u2028")


# --- the consumer -----------------------------------------------------------------------------------


@database_sync_to_async
def fresh_tables() -> None:
    # Hypothesis seeds ``random`` alike for every example, so channel names repeat: start from empty tables.
    Task.objects.all().delete()
    Connection.objects.all().delete()


@pytest.mark.django_db(transaction=True)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(burst=st.lists(frame_texts, min_size=1, max_size=12))
async def test_the_broker_answers_a_burst_of_random_frames_and_still_delivers_accepted_work(burst: list[str]) -> None:
    await fresh_tables()
    peers = Peers()
    try:
        client = await peers.client("fuzzed")
        await client.submit("before", "accepted before the burst")
        for text in burst:
            expected_error = None
            statuses = 1  # STATUS answers up to and including the one to our own STATUS
            try:
                if isinstance(protocol.parse(protocol.decode(text), PARSERS), protocol.Status):
                    statuses = 2
            except ProtocolError as exc:
                expected_error = exc.code
            await client.send_text(text)
            # A STATUS after each frame: everything before its answer is the answer to the frame.
            await client.send({"type": "STATUS"})
            answers = []
            while statuses:
                output = await client.communicator.receive_output(10)
                assert output["type"] == "websocket.send", f"the broker closed on {text[:200]!r}: {output}"
                answers.append(assert_sendable(output["text"]))
                statuses -= answers[-1]["type"] == "STATUS"
            replies = [answer for answer in answers if answer["type"] != "MESSAGE"]  # a fuzzed PUBLISH may fan out
            if expected_error is not None:
                assert replies[0]["type"] == "ERROR" and replies[0]["code"] == expected_error, (text[:200], answers)

        worker = await peers.worker()
        while True:  # the burst may have submitted tasks of its own; answer everything
            task = await worker.next_task()
            await worker.respond(task, task["data"].upper())
            if task["data"] == "accepted before the burst":
                break
        while (frame := await client.recv())["type"] != "RESPONSE_TASK" or frame["messageId"] != "before":
            assert frame["type"] in ("RESPONSE_TASK", "TASK_FAILED", "MESSAGE"), frame
        assert frame["data"] == "ACCEPTED BEFORE THE BURST"
    finally:
        await peers.close_all()
