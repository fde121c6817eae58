"""The admission gate bounds `run` and `run_async` together, and the byte budget bounds bytes in flight."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TEST_TOKEN, wait_for

from components import HuggingFaceAPITextToImage
from components.admission import AdmissionGate, ByteBudget
from components.errors import ServerBusyError


@pytest.fixture
def one_slot(fresh_upstream, monkeypatch):
    """A component allowed one upstream call at a time and no queue, against an upstream that takes a while."""
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    fresh_upstream.latency = 1.0
    component = HuggingFaceAPITextToImage(
        endpoint_url=fresh_upstream.url, width=64, height=64, max_concurrency=1, max_queue=0, cache_max_bytes=0
    )
    yield component
    component.close()


def test_sync_run_passes_the_gate(one_slot, fresh_upstream):
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(one_slot.run, prompt="holds the slot")
        assert wait_for(lambda: len(fresh_upstream.requests) == 1)
        with pytest.raises(ServerBusyError):
            one_slot.run(prompt="refused")
        assert first.result()["images"][0].meta["width"] == 64
    assert len(fresh_upstream.requests) == 1


async def test_one_gate_for_both_paths(one_slot, fresh_upstream):
    await one_slot.warm_up_async()
    held = asyncio.create_task(one_slot.run_async(prompt="async holds the slot"))
    assert await asyncio.to_thread(wait_for, lambda: len(fresh_upstream.requests) == 1)
    with pytest.raises(ServerBusyError):
        await asyncio.to_thread(one_slot.run, prompt="sync refused")
    await held
    await one_slot.close_async()
    assert len(fresh_upstream.requests) == 1


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
