"""The wire protocol as pure functions: decoding, parsing, validators, refs and frames (no database)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker import protocol
from broker.protocol import ErrorCode, ProtocolError


def parse_task_frame(obj: dict[str, Any]) -> Any:
    return protocol.parse(protocol.decode(json.dumps(obj)), protocol.TASK_PARSERS)


def refusal(obj: Any) -> ProtocolError:
    """The ProtocolError that decoding and parsing ``obj`` (JSON-encoded) raises."""
    with pytest.raises(ProtocolError) as caught:
        parse_task_frame(obj)
    return caught.value


# --- encode / decode ------------------------------------------------------------------


def test_encode_is_compact_and_keeps_non_ascii_text():
    assert protocol.encode({"type": "X", "data": "grüße 🐢"}) == '{"type":"X","data":"grüße 🐢"}'


def test_decode_returns_the_json_object():
    assert protocol.decode('{"type":"STATUS","extra":[1]}') == {"type": "STATUS", "extra": [1]}


@pytest.mark.parametrize("text", ["", "{", "not json", '{"type":"X",}', "{'type':'X'}", "[" * 100_000])
def test_text_that_is_not_json_is_bad_json_with_empty_ref(text):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(text)
    assert caught.value.code is ErrorCode.BAD_JSON
    assert caught.value.ref == {}


@pytest.mark.parametrize("text", ["[]", '[{"type":"STATUS"}]', '"STATUS"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_bad_frame_with_empty_ref(text):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(text)
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert caught.value.ref == {}


@pytest.mark.parametrize(
    ("obj", "ref"),
    [
        ({}, {}),
        ({"messageId": "m1", "data": "x"}, {"messageId": "m1"}),
        ({"type": None}, {}),
        ({"type": ""}, {"type": ""}),
        ({"type": 7, "taskId": "3"}, {"type": 7, "taskId": "3"}),
        ({"type": ["REQUEST_TASK"]}, {}),
        ({"type": True}, {}),
    ],
)
def test_an_object_without_a_non_empty_string_type_is_bad_frame(obj, ref):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode(json.dumps(obj))
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert caught.value.ref == ref


# --- ref_of and error_frame ---------------------------------------------------------------


def test_ref_repeats_type_and_identifying_fields_only():
    obj = {"type": "REQUEST_TASK", "messageId": "m", "taskId": "1", "topic": "a.b", "data": "secret", "x": 1}
    assert protocol.ref_of(obj) == {"type": "REQUEST_TASK", "messageId": "m", "taskId": "1", "topic": "a.b"}


def test_ref_keeps_numbers_but_not_booleans_nulls_or_containers():
    obj = {"type": "REQUEST_TASK", "messageId": 5, "taskId": True, "topic": None}
    assert protocol.ref_of(obj) == {"type": "REQUEST_TASK", "messageId": 5}
    assert protocol.ref_of({"type": "X", "messageId": ["m"], "taskId": {"a": 1}}) == {"type": "X"}


def test_ref_cuts_a_huge_identifier_instead_of_echoing_it():
    ref = protocol.ref_of({"type": "REQUEST_TASK", "messageId": "m" * 10_000})
    assert ref["messageId"] == "m" * protocol.MAX_ID_LENGTH + "..."


def test_ref_keeps_an_identifier_of_the_maximum_length_whole():
    ref = protocol.ref_of({"type": "REQUEST_TASK", "messageId": "m" * protocol.MAX_ID_LENGTH})
    assert ref["messageId"] == "m" * protocol.MAX_ID_LENGTH


def test_error_frame_has_type_code_message_and_ref():
    frame = protocol.error_frame(ErrorCode.UNKNOWN_TASK, "nope", {"type": "RESPONSE_TASK", "taskId": "9"})
    assert frame == {
        "type": "ERROR",
        "code": "UNKNOWN_TASK",
        "message": "nope",
        "ref": {"type": "RESPONSE_TASK", "taskId": "9"},
    }
    assert json.loads(protocol.encode(frame)) == frame


def test_error_frame_without_ref_has_an_empty_object():
    assert protocol.error_frame(ErrorCode.BAD_JSON, "bad")["ref"] == {}


def test_every_error_code_of_the_protocol_exists_and_spells_itself():
    codes = {
        "BAD_JSON",
        "BAD_FRAME",
        "UNKNOWN_TYPE",
        "NOT_REGISTERED",
        "WRONG_ROLE",
        "ALREADY_REGISTERED",
        "UNKNOWN_TASK",
        "UNKNOWN_TOPIC",
        "BAD_EMAIL",
        "UNAUTHORIZED",
        "RATE_LIMITED",
    }
    assert {str(code) for code in ErrorCode} == codes
    assert all(ErrorCode[code] == code for code in codes)


# --- field validators -------------------------------------------------------------------


def test_required_str_returns_the_value():
    assert protocol.required_str({"type": "T", "data": ""}, "data") == ""
    assert protocol.required_str({"type": "T", "data": "x" * 5}, "data", max_length=5) == "xxxxx"


@pytest.mark.parametrize("value", [None, 1, 1.5, True, [], {}])
def test_required_str_refuses_a_missing_or_non_string_field(value):
    obj = {"type": "T", "messageId": "m"} if value is None else {"type": "T", "messageId": "m", "data": value}
    with pytest.raises(ProtocolError) as caught:
        protocol.required_str(obj, "data")
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert caught.value.ref == {"type": "T", "messageId": "m"}


def test_required_str_refuses_empty_when_asked_to():
    with pytest.raises(ProtocolError) as caught:
        protocol.required_str({"type": "T", "data": ""}, "data", allow_empty=False)
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_required_str_refuses_a_value_over_the_maximum_length():
    with pytest.raises(ProtocolError) as caught:
        protocol.required_str({"type": "T", "data": "x" * 6}, "data", max_length=5)
    assert caught.value.code is ErrorCode.BAD_FRAME


def test_optional_str_treats_missing_and_null_as_absent_and_refuses_empty_by_default():
    assert protocol.optional_str({"type": "T"}, "clientId") is None
    assert protocol.optional_str({"type": "T", "clientId": None}, "clientId") is None
    assert protocol.optional_str({"type": "T", "clientId": "c"}, "clientId") == "c"
    with pytest.raises(ProtocolError):
        protocol.optional_str({"type": "T", "clientId": ""}, "clientId")
    assert protocol.optional_str({"type": "T", "clientId": ""}, "clientId", allow_empty=True) == ""


def test_optional_int_accepts_integers_within_bounds_only():
    assert protocol.optional_int({"type": "T"}, "n", minimum=1, maximum=3) is None
    assert protocol.optional_int({"type": "T", "n": None}, "n", minimum=1, maximum=3) is None
    assert protocol.optional_int({"type": "T", "n": 1}, "n", minimum=1, maximum=3) == 1
    assert protocol.optional_int({"type": "T", "n": 3}, "n", minimum=1, maximum=3) == 3


@pytest.mark.parametrize("value", [0, 4, -1, True, False, 2.0, "2", [2]])
def test_optional_int_refuses_out_of_range_booleans_floats_and_strings(value):
    with pytest.raises(ProtocolError) as caught:
        protocol.optional_int({"type": "T", "n": value}, "n", minimum=1, maximum=3)
    assert caught.value.code is ErrorCode.BAD_FRAME
    assert caught.value.ref == {"type": "T"}


def test_optional_seconds_accepts_positive_numbers_up_to_the_maximum_as_floats():
    assert protocol.optional_seconds({"type": "T"}, "timeout", maximum=10) is None
    value = protocol.optional_seconds({"type": "T", "timeout": 2}, "timeout", maximum=10)
    assert value == 2.0 and isinstance(value, float)
    assert protocol.optional_seconds({"type": "T", "timeout": 0.25}, "timeout", maximum=10) == 0.25
    assert protocol.optional_seconds({"type": "T", "timeout": 10}, "timeout", maximum=10) == 10.0


@pytest.mark.parametrize("value", [0, -1, 10.5, float("nan"), float("inf"), True, "1", [1]])
def test_optional_seconds_refuses_zero_negative_too_large_non_finite_and_non_numbers(value):
    with pytest.raises(ProtocolError) as caught:
        protocol.optional_seconds({"type": "T", "timeout": value}, "timeout", maximum=10)
    assert caught.value.code is ErrorCode.BAD_FRAME


# --- parsing the task frames ----------------------------------------------------------------


def test_unknown_type_is_refused_with_its_type_and_ids_in_the_ref():
    error = refusal({"type": "DO_SOMETHING", "messageId": "m1", "data": "x"})
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.ref == {"type": "DO_SOMETHING", "messageId": "m1"}


def test_type_names_are_case_sensitive():
    assert refusal({"type": "register_client", "data": ""}).code is ErrorCode.UNKNOWN_TYPE


def test_register_client_without_client_id():
    assert parse_task_frame({"type": "REGISTER_CLIENT", "data": ""}) == protocol.RegisterClient(client_id=None)


def test_register_client_with_client_id():
    frame = parse_task_frame({"type": "REGISTER_CLIENT", "data": "", "clientId": "billing"})
    assert frame == protocol.RegisterClient(client_id="billing")


@pytest.mark.parametrize("client_id", ["", 5, ["c"], "c" * 257])
def test_register_client_refuses_a_bad_client_id(client_id):
    error = refusal({"type": "REGISTER_CLIENT", "data": "", "clientId": client_id})
    assert error.code is ErrorCode.BAD_FRAME
    assert error.ref == {"type": "REGISTER_CLIENT"}


def test_register_worker_defaults_to_concurrency_one():
    assert parse_task_frame({"type": "REGISTER_WORKER", "data": ""}) == protocol.RegisterWorker(concurrency=1)
    assert parse_task_frame({"type": "REGISTER_WORKER", "concurrency": None}) == protocol.RegisterWorker(1)


def test_register_worker_takes_its_concurrency_up_to_the_limit():
    assert parse_task_frame({"type": "REGISTER_WORKER", "concurrency": 4}).concurrency == 4
    limit = protocol.MAX_CONCURRENCY
    assert parse_task_frame({"type": "REGISTER_WORKER", "concurrency": limit}).concurrency == limit


@pytest.mark.parametrize("concurrency", [0, -2, protocol.MAX_CONCURRENCY + 1, "2", 2.5, 2.0, True])
def test_register_worker_refuses_a_concurrency_that_is_not_an_int_in_range(concurrency):
    error = refusal({"type": "REGISTER_WORKER", "data": "", "concurrency": concurrency})
    assert error.code is ErrorCode.BAD_FRAME
    assert error.ref == {"type": "REGISTER_WORKER"}


def test_request_task_takes_message_id_and_data():
    frame = parse_task_frame({"type": "REQUEST_TASK", "messageId": "m1", "data": "payload"})
    assert frame == protocol.RequestTask(message_id="m1", data="payload", timeout=None, max_attempts=None)


def test_request_task_takes_timeout_and_max_attempts():
    frame = parse_task_frame({"type": "REQUEST_TASK", "messageId": "m", "data": "", "timeout": 5, "maxAttempts": 2})
    assert frame == protocol.RequestTask(message_id="m", data="", timeout=5.0, max_attempts=2)


def test_request_task_ignores_unknown_extra_fields():
    frame = parse_task_frame({"type": "REQUEST_TASK", "messageId": "m", "data": "d", "priority": 9, "x": None})
    assert frame == protocol.RequestTask(message_id="m", data="d", timeout=None, max_attempts=None)


def test_request_task_accepts_a_message_id_of_exactly_the_maximum_length():
    message_id = "m" * protocol.MAX_ID_LENGTH
    assert parse_task_frame({"type": "REQUEST_TASK", "messageId": message_id, "data": ""}).message_id == message_id


@pytest.mark.parametrize(
    ("frame", "ref"),
    [
        ({"type": "REQUEST_TASK", "data": "d"}, {"type": "REQUEST_TASK"}),
        ({"type": "REQUEST_TASK", "messageId": "", "data": "d"}, {"type": "REQUEST_TASK", "messageId": ""}),
        (
            {"type": "REQUEST_TASK", "messageId": "m" * 257, "data": "d"},
            {"type": "REQUEST_TASK", "messageId": "m" * 256 + "..."},
        ),
        ({"type": "REQUEST_TASK", "messageId": 12, "data": "d"}, {"type": "REQUEST_TASK", "messageId": 12}),
        ({"type": "REQUEST_TASK", "messageId": None, "data": "d"}, {"type": "REQUEST_TASK"}),
        ({"type": "REQUEST_TASK", "messageId": ["m"], "data": "d"}, {"type": "REQUEST_TASK"}),
        ({"type": "REQUEST_TASK", "messageId": "m"}, {"type": "REQUEST_TASK", "messageId": "m"}),
        ({"type": "REQUEST_TASK", "messageId": "m", "data": 1}, {"type": "REQUEST_TASK", "messageId": "m"}),
        ({"type": "REQUEST_TASK", "messageId": "m", "data": {"a": 1}}, {"type": "REQUEST_TASK", "messageId": "m"}),
        ({"type": "REQUEST_TASK", "messageId": "m", "data": None}, {"type": "REQUEST_TASK", "messageId": "m"}),
        (
            {"type": "REQUEST_TASK", "messageId": "m", "data": "", "timeout": 0},
            {"type": "REQUEST_TASK", "messageId": "m"},
        ),
        (
            {"type": "REQUEST_TASK", "messageId": "m", "data": "", "timeout": "5"},
            {"type": "REQUEST_TASK", "messageId": "m"},
        ),
        (
            {"type": "REQUEST_TASK", "messageId": "m", "data": "", "maxAttempts": 0},
            {"type": "REQUEST_TASK", "messageId": "m"},
        ),
        (
            {"type": "REQUEST_TASK", "messageId": "m", "data": "", "maxAttempts": protocol.MAX_ATTEMPTS_LIMIT + 1},
            {"type": "REQUEST_TASK", "messageId": "m"},
        ),
    ],
    ids=[
        "no messageId",
        "empty messageId",
        "messageId too long",
        "messageId a number",
        "messageId null",
        "messageId a list",
        "no data",
        "data a number",
        "data an object",
        "data null",
        "zero timeout",
        "timeout a string",
        "zero maxAttempts",
        "maxAttempts too large",
    ],
)
def test_request_task_with_a_bad_field_is_bad_frame_with_its_ref(frame, ref):
    error = refusal(frame)
    assert error.code is ErrorCode.BAD_FRAME
    assert error.ref == ref


def test_response_task_takes_task_id_and_data():
    frame = parse_task_frame({"type": "RESPONSE_TASK", "taskId": "17", "data": "ok"})
    assert frame == protocol.ResponseTask(task_id="17", data="ok")


@pytest.mark.parametrize(
    ("frame", "ref"),
    [
        ({"type": "RESPONSE_TASK", "data": "r"}, {"type": "RESPONSE_TASK"}),
        ({"type": "RESPONSE_TASK", "taskId": "", "data": "r"}, {"type": "RESPONSE_TASK", "taskId": ""}),
        ({"type": "RESPONSE_TASK", "taskId": 17, "data": "r"}, {"type": "RESPONSE_TASK", "taskId": 17}),
        ({"type": "RESPONSE_TASK", "taskId": "17"}, {"type": "RESPONSE_TASK", "taskId": "17"}),
        ({"type": "RESPONSE_TASK", "taskId": "17", "data": 3}, {"type": "RESPONSE_TASK", "taskId": "17"}),
    ],
    ids=["no taskId", "empty taskId", "taskId a number", "no data", "data a number"],
)
def test_response_task_with_a_bad_field_is_bad_frame_with_its_ref(frame, ref):
    error = refusal(frame)
    assert error.code is ErrorCode.BAD_FRAME
    assert error.ref == ref


def test_fail_task_takes_task_id_and_an_optional_reason():
    assert parse_task_frame({"type": "FAIL_TASK", "taskId": "3", "data": "boom"}) == protocol.FailTask("3", "boom")
    assert parse_task_frame({"type": "FAIL_TASK", "taskId": "3"}) == protocol.FailTask("3", "")
    assert parse_task_frame({"type": "FAIL_TASK", "taskId": "3", "data": ""}) == protocol.FailTask("3", "")


def test_fail_task_refuses_a_missing_task_id_or_a_non_string_reason():
    assert refusal({"type": "FAIL_TASK", "data": "boom"}).code is ErrorCode.BAD_FRAME
    error = refusal({"type": "FAIL_TASK", "taskId": "3", "data": 5})
    assert error.code is ErrorCode.BAD_FRAME
    assert error.ref == {"type": "FAIL_TASK", "taskId": "3"}


def test_touch_task_takes_a_task_id():
    assert parse_task_frame({"type": "TOUCH_TASK", "taskId": "8"}) == protocol.TouchTask("8")
    assert refusal({"type": "TOUCH_TASK"}).code is ErrorCode.BAD_FRAME
    assert refusal({"type": "TOUCH_TASK", "taskId": 8}).code is ErrorCode.BAD_FRAME


def test_status_needs_nothing_but_its_type():
    assert parse_task_frame({"type": "STATUS"}) == protocol.Status()
    assert parse_task_frame({"type": "STATUS", "data": {"anything": 1}}) == protocol.Status()


# --- frames the broker sends ---------------------------------------------------------------


def test_broker_frames_have_the_shapes_of_the_protocol():
    assert protocol.request_task_frame("5", "d") == {"type": "REQUEST_TASK", "taskId": "5", "data": "d"}
    assert protocol.response_task_frame("m", "r") == {"type": "RESPONSE_TASK", "messageId": "m", "data": "r"}
    assert protocol.task_failed_frame("m", "e") == {"type": "TASK_FAILED", "messageId": "m", "data": "e"}
    assert protocol.status_frame({"idleWorkers": 1}) == {"type": "STATUS", "data": {"idleWorkers": 1}}
