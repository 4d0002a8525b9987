"""Limits (issue 5): frame size, tasks in flight per client, frames per second per connection.

Each limit is set low through the settings fixture and then crossed on the
wire; the answer is the one PROTOCOL.md names (a close with 1009, or ERROR
``RATE_LIMITED`` with the frame's ``ref`` and the connection left open) and
the database shows that the refused frame changed nothing.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext

from broker import dispatch
from broker.models import Task
from broker.ratelimit import TokenBucket
from tests.communicators import Peer

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def message_ids() -> list[str]:
    return list(Task.objects.order_by("pk").values_list("message_id", flat=True))


async def still_open(peer: Peer) -> None:
    """The connection answers a frame after the refusal."""
    assert "idleWorkers" in await peer.status()


# --- frame size ----------------------------------------------------------------------------------------


async def test_a_frame_over_the_size_limit_closes_the_connection_with_1009(peers, settings):
    settings.TURTLEMQ_MAX_FRAME_BYTES = 1000
    client = await peers.client()
    await client.submit("kept", "x" * 500)

    await client.submit("too big", "x" * 1000)

    assert await client.expect_close() == 1009
    assert await message_ids() == ["kept"]


# --- tasks in flight per client ----------------------------------------------------------------------------


async def test_a_client_without_client_id_at_its_in_flight_limit_gets_rate_limited(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 2
    client = await peers.client()
    await client.submit("m1", "a")
    await client.submit("m2", "b")

    await client.submit("m3", "c")

    await client.expect_error("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m3"})
    await still_open(client)
    assert await message_ids() == ["m1", "m2"]


async def test_a_result_makes_room_for_the_next_task(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 1
    client = await peers.client()
    await client.submit("m1", "a")
    await client.submit("m2", "b")
    await client.expect_error("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m2"})

    worker = await peers.worker()
    await worker.respond(await worker.next_task(), "A")
    assert await client.expect("RESPONSE_TASK") == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "A"}

    await client.submit("m2", "b")
    assert (await worker.next_task())["data"] == "b"


async def test_the_limit_is_per_connection_for_clients_without_client_id(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 1
    first, second = await peers.client(), await peers.client()
    await first.submit("m1", "a")

    await second.submit("m1", "b")

    await still_open(second)  # no ERROR came before this answer
    assert await message_ids() == ["m1", "m1"]


async def test_the_limit_of_a_client_id_holds_across_reconnects(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 2
    first = await peers.client("billing")
    await first.submit("m1", "a")
    await first.submit("m2", "b")
    await still_open(first)
    await first.close()

    again = await peers.client("billing")
    await again.submit("m3", "c")

    await again.expect_error("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m3"})
    assert await message_ids() == ["m1", "m2"]


async def test_the_limit_of_a_client_id_counts_all_its_connections(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 2
    one, other = await peers.client("billing"), await peers.client("billing")
    await one.submit("m1", "a")
    await other.submit("m2", "b")
    await still_open(other)

    await one.submit("m3", "c")

    await one.expect_error("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m3"})


async def test_repeats_of_a_client_id_at_its_limit_are_answered_as_usual(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 2
    client = await peers.client("billing")
    worker = await peers.worker()
    await client.submit("done", "a")
    await worker.respond(await worker.next_task(), "A")
    await client.expect("RESPONSE_TASK")
    await client.submit("m1", "b")
    await client.submit("m2", "c")  # the worker holds m1; two unfinished: at the limit

    await client.submit("m1", "b")  # in flight: creates nothing, and is no error
    await client.submit("done", "a")  # finished: the stored result again

    assert await client.expect("RESPONSE_TASK") == {"type": "RESPONSE_TASK", "messageId": "done", "data": "A"}
    await still_open(client)
    assert await message_ids() == ["done", "m1", "m2"]


async def test_zero_means_no_in_flight_limit(peers, settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 0
    client = await peers.client("billing")
    for n in range(5):
        await client.submit(f"m{n}", "x")

    await still_open(client)
    assert len(await message_ids()) == 5


def test_the_in_flight_count_of_a_client_id_adds_no_statement_to_submitting():
    """The de-duplication look-up that a clientId needs anyway also counts its unfinished tasks."""
    with CaptureQueriesContext(connection) as queries:
        dispatch.submit_task("client.1", "billing", "m1", "data")

    # Transaction control (BEGIN, the savepoint around the insert) is not a query.
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    statements = [s for s in statements if s not in ("BEGIN", "SAVEPOINT", "RELEASE")]
    before_insert = statements[: statements.index("INSERT")]
    assert before_insert == ["SELECT"], statements


def test_the_in_flight_limit_refuses_before_storing_anything(settings):
    settings.TURTLEMQ_MAX_CLIENT_IN_FLIGHT = 1
    dispatch.submit_task("client.1", "billing", "m1", "data")

    with pytest.raises(dispatch.InFlightLimit):
        dispatch.submit_task("client.2", "billing", "m2", "data")
    with pytest.raises(dispatch.InFlightLimit):
        dispatch.submit_task("client.3", None, "m3", "data", unanswered=1)
    assert list(Task.objects.values_list("message_id", flat=True)) == ["m1"]


# --- frames per second per connection ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_allows_a_burst_then_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)

    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 60  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_a_token_bucket_with_no_rate_allows_everything():
    bucket = TokenBucket(rate=0, burst=0, clock=FakeClock())

    assert all(bucket.take() for _ in range(10_000))


async def test_frames_beyond_the_rate_get_rate_limited_and_are_not_processed(peers, settings):
    settings.TURTLEMQ_MAX_FRAMES_PER_SECOND = 0.001  # no token comes back during the test
    settings.TURTLEMQ_FRAME_BURST = 3
    client = await peers.client()  # frame 1
    await client.submit("m1", "a")  # frame 2
    await client.submit("m2", "b")  # frame 3

    await client.submit("m3", "c")
    await client.send_text("{not json")

    await client.expect_error("RATE_LIMITED", {"type": "REQUEST_TASK", "messageId": "m3"})
    await client.expect_error("RATE_LIMITED", {})
    await client.assert_silent()  # and the connection stays open
    assert not client.communicator.future.done()
    assert await message_ids() == ["m1", "m2"]


async def test_each_connection_has_its_own_frame_budget(peers, settings):
    settings.TURTLEMQ_MAX_FRAMES_PER_SECOND = 0.001
    settings.TURTLEMQ_FRAME_BURST = 1
    busy = await peers.connect()
    await busy.status()
    await busy.send({"type": "STATUS"})
    await busy.expect_error("RATE_LIMITED", {"type": "STATUS"})

    other = await peers.connect()
    assert "idleWorkers" in await other.status()
