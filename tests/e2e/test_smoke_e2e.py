"""A first real round trip through daphne on both stacks."""

import pytest

from .peers import Peer

pytestmark = pytest.mark.e2e


async def test_task_round_trip_through_real_servers(stack):
    worker = await Peer.connect(stack.worker_url)
    await worker.register_worker()
    client = await Peer.connect(stack.client_url)
    await client.register_client()
    await client.send({"type": "REQUEST_TASK", "messageId": "m1", "data": "hello"})
    task = await worker.expect("REQUEST_TASK")
    await worker.send({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "HELLO"})
    assert await client.recv() == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "HELLO"}
    await client.close()
    await worker.close()
