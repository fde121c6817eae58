"""
Admission is the server's: one gate around the served pipeline for every door, and it bounds callers on threads and
event loops together. The byte budget (the API component's own) bounds bytes in flight.
"""

import asyncio
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TEST_TOKEN, running, server_env, wait_for
from haystack import Pipeline

from components import HuggingFaceAPITextToImage
from components.byte_budget import ByteBudget
from components.errors import ServerBusyError
from image_generation_server.admission import AdmissionGate
from image_generation_server.generation import COMPONENT, Runner
from image_generation_server.settings import load_settings


@pytest.fixture
def one_slot(fresh_upstream, monkeypatch):
    """The served pipeline allowed one generation at a time and no queue, against an upstream that takes a while."""
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    fresh_upstream.latency = 1.0
    pipeline = Pipeline()
    pipeline.add_component(COMPONENT, HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url, width=64, height=64))
    pipeline.warm_up()
    yield Runner(pipeline, load_settings(max_concurrency=1, max_queue=0, cache_bytes=0))
    pipeline.get_component(COMPONENT).close()


async def test_the_runner_admits_one_and_refuses_beyond_its_queue(one_slot, fresh_upstream):
    held = asyncio.create_task(one_slot.generate(prompt="holds the slot"))
    assert await asyncio.to_thread(wait_for, lambda: len(fresh_upstream.requests) == 1)
    with pytest.raises(ServerBusyError):
        await one_slot.generate(prompt="refused")
    [image] = await held
    assert image.meta["width"] == 64
    assert len(fresh_upstream.requests) == 1
    assert (one_slot.gate._free, len(one_slot.gate._waiters)) == (1, 0)
    await one_slot.generator.close_async()


def test_every_door_shares_one_gate_the_json_variant_included(upstream, fresh_upstream, tmp_path):
    """One slot, no queue: while the native route holds the slot, the JSON variant is refused, and vice versa."""
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_MAX_CONCURRENCY="1", IMAGE_GENERATION_MAX_QUEUE="0"
    )
    with running(tmp_path, env) as server, ThreadPoolExecutor(1) as pool:
        fresh_upstream.latency = 1.0
        for holder, refused in (
            ("/image_generation/run", "/image_generation_json/run"),
            ("/image_generation_json/run", "/image_generation/run"),
        ):
            fresh_upstream.requests.clear()
            held = pool.submit(post_to, server, holder, {"prompt": "holds the slot", "width": 64, "height": 64})
            assert wait_for(lambda: len(fresh_upstream.requests) == 1)
            status, headers = post_to(server, refused, {"prompt": "refused", "width": 64, "height": 64})
            assert (status, headers.get("retry-after")) == (503, "1")
            assert held.result(30)[0] == 200
            assert len(fresh_upstream.requests) == 1


def post_to(server, path: str, body: dict) -> tuple[int, dict[str, str]]:
    """POST `body` as JSON to `path`; the status and the headers."""
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {name.lower(): value for name, value in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {name.lower(): value for name, value in e.headers.items()}


def test_queued_callers_enter_in_order_from_threads_and_loops():
    gate = AdmissionGate(max_concurrency=1, max_queue=2)
    order: list[str] = []
    release = threading.Event()

    def hold() -> None:
        with gate.slot():
            order.append("holder")
            release.wait(10)

    async def queued_async() -> None:
        async with gate.slot_async():
            order.append("async")

    def queued_sync() -> None:
        with gate.slot():
            order.append("sync")

    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(hold)
        assert wait_for(lambda: order == ["holder"])
        waiting_async = pool.submit(asyncio.run, queued_async())
        assert wait_for(lambda: len(gate._waiters) == 1)
        waiting_sync = pool.submit(queued_sync)
        assert wait_for(lambda: len(gate._waiters) == 2)
        with pytest.raises(ServerBusyError):  # the queue is full
            asyncio.run(queued_async())
        release.set()
        for future in (holder, waiting_async, waiting_sync):
            future.result(10)
    assert order == ["holder", "async", "sync"]
    assert (gate._free, len(gate._waiters)) == (1, 0)


async def test_a_cancelled_waiter_gives_its_place_back():
    gate = AdmissionGate(max_concurrency=1, max_queue=1)
    async with gate.slot_async():
        waiter = asyncio.create_task(gate.slot_async().__aenter__())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(gate._waiters) == 0
    async with gate.slot_async():  # the one slot is free again
        pass
    assert gate._free == 1


def test_byte_budget_refuses_past_its_total_and_returns_leases():
    budget = ByteBudget(100)
    with budget.lease() as first:
        first.take(60)
        with budget.lease() as second, pytest.raises(ServerBusyError):
            second.take(50)
        assert budget.in_use == 60
    assert budget.in_use == 0


async def test_a_slot_handed_over_as_its_waiter_is_cancelled_is_passed_on():
    """The waiter is cancelled after the hand-over ran but before it woke: it must give the slot back."""
    gate = AdmissionGate(max_concurrency=1, max_queue=1)
    holder = gate.slot_async()
    await holder.__aenter__()
    waiter = asyncio.create_task(gate.slot_async().__aenter__())
    await asyncio.sleep(0.05)  # queued
    await holder.__aexit__(None, None, None)  # hands the slot over (scheduled on this loop)
    await asyncio.sleep(0)  # the hand-over runs; the waiter is woken but has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(2), gate.slot_async():  # a lost slot would queue this forever
        pass


async def test_a_slot_on_its_way_to_a_cancelled_waiter_is_passed_on():
    """The waiter is cancelled while the hand-over is still scheduled: the hand-over must give the slot back."""
    gate = AdmissionGate(max_concurrency=1, max_queue=1)
    holder = gate.slot_async()
    await holder.__aenter__()
    waiter = asyncio.create_task(gate.slot_async().__aenter__())
    await asyncio.sleep(0.05)  # queued
    await holder.__aexit__(None, None, None)  # the hand-over is scheduled, not yet run
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(2), gate.slot_async():
        pass
