"""
Each touchpoint of `image_generation_server/private_hayhooks.py` with Hayhooks' durable internals, on the real stores.

If a Hayhooks upgrade moves `DurableRuntime._deployments`, the memory store's runnable index or the Redis store's,
these fail here rather than as a silent `queue` missing from job statuses.
"""

import asyncio

import pytest
from fastapi import FastAPI
from hayhooks.durable.redis import RedisExecutionStore
from hayhooks.durable.runtime import DurableDeployment, DurableRuntime
from hayhooks.durable.store import MemoryExecutionStore
from pydantic import BaseModel
from redis import asyncio as redis
from redis_server import RedisServer

from image_generation_server.private_hayhooks import QueueState, durable_deployment, forget, queue_state

NAME = "queue_test"


class Request(BaseModel):
    prompt: str


RELEASE: asyncio.Event  # made per test, in its event loop: once set, the running job ends


async def runner(context, request: Request) -> dict:
    await RELEASE.wait()
    return {}


def durable(store) -> DurableDeployment:
    """A deployment with one worker slot."""
    return DurableDeployment(NAME, "1", store, Request, runner)


@pytest.fixture(params=["memory", "redis"])
async def queue(request, tmp_path):
    """A started deployment on each store, whose one slot runs a job until the test sets `RELEASE`."""
    global RELEASE  # noqa: PLW0603
    RELEASE = asyncio.Event()
    server = client = None
    if request.param == "memory":
        store = MemoryExecutionStore(NAME)
    else:
        server = RedisServer(tmp_path).start()
        client = redis.Redis.from_url(server.url, protocol=2)
        store = RedisExecutionStore(client, NAME)
    started = durable(store)
    await started.start()
    try:
        yield started
    finally:
        RELEASE.set()
        await started.close()
        if client is not None:
            await client.aclose()
        if server is not None:
            server.stop()


def test_the_deployment_is_found_in_the_apps_runtime():
    app = FastAPI()
    assert durable_deployment(app, NAME) is None  # not in durable mode
    queued = durable(MemoryExecutionStore(NAME))
    app.state.durable_runtime = DurableRuntime([queued])
    assert durable_deployment(app, NAME) is queued
    assert durable_deployment(app, "other") is None


async def test_jobs_ahead_are_those_queued_before_and_those_running(queue):
    ids = [(await queue.submit({"prompt": str(i)})).control.run_id for i in range(3)]

    async def running() -> list[str]:
        controls = [await queue.store.read_control(run_id) for run_id in ids]
        return [control.run_id for control in controls if control.status.value == "running"]

    async with asyncio.timeout(20):
        while not await running():  # noqa: ASYNC110 (the store is polled, as a client would)
            await asyncio.sleep(0.05)
    [claimed] = await running()
    assert await queue_state(queue, claimed) is None  # running: not in the queue
    waiting = [run_id for run_id in ids if run_id != claimed]
    states = sorted([await queue_state(queue, run_id) for run_id in waiting], key=lambda state: state.ahead)
    assert states == [QueueState(queued_ahead=0, running=1), QueueState(queued_ahead=1, running=1)]
    assert [state.ahead for state in states] == [1, 2]


async def test_forget_deletes_a_finished_job_and_leaves_an_unfinished_one(queue):
    run_id = (await queue.submit({"prompt": "forget me"}, idempotency_key="once")).control.run_id
    async with asyncio.timeout(20):
        while (await queue.store.read_control(run_id)).status.value != "running":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await forget(queue, run_id)
    assert (await queue.store.read_control(run_id)).status.value == "running"  # not finished: left alone

    RELEASE.set()
    async with asyncio.timeout(20):
        while not (await queue.store.read_control(run_id)).terminal:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await forget(queue, run_id)
    assert await queue.store.read_control(run_id) is None
    if isinstance(queue.store, RedisExecutionStore):
        assert await queue.store.redis.keys(f"*{run_id}*") == []  # control, progress, chunks, payloads
    again = await queue.submit({"prompt": "forget me"}, idempotency_key="once")
    assert again.created and again.control.run_id != run_id  # its idempotency key went with it
