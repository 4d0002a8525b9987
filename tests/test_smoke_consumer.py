"""A first round trip through the consumer, in-process."""

import pytest
from channels.testing import WebsocketCommunicator

from turtlemq_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


async def connect(path: str = "/") -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, path)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def test_task_goes_from_client_to_worker_and_result_comes_back():
    worker = await connect()
    await worker.send_json_to({"type": "REGISTER_WORKER", "data": ""})
    assert await worker.receive_json_from(timeout=5) == {"type": "REGISTER_WORKER", "data": ""}
    client = await connect("/ws/")
    await client.send_json_to({"type": "REGISTER_CLIENT", "data": ""})
    assert await client.receive_json_from(timeout=5) == {"type": "REGISTER_CLIENT", "data": ""}
    await client.send_json_to({"type": "REQUEST_TASK", "messageId": "m1", "data": "hello"})
    task = await worker.receive_json_from(timeout=5)
    assert task["type"] == "REQUEST_TASK" and task["data"] == "hello"
    await worker.send_json_to({"type": "RESPONSE_TASK", "taskId": task["taskId"], "data": "HELLO"})
    assert await client.receive_json_from(timeout=5) == {"type": "RESPONSE_TASK", "messageId": "m1", "data": "HELLO"}
    await client.disconnect()
    await worker.disconnect()
