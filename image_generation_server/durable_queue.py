"""
The one adapter to Hayhooks' durable execution internals.

It finds a deployment's store, says where a queued job stands, and deletes a finished job before its time.

Hayhooks 2.1 has no public way to reach a deployment's execution store from the app, nor to ask how many jobs are
queued ahead of one. This module reads `DurableRuntime._deployments`, `MemoryExecutionStore._runnable` and the Redis
store's runnable index; `tests/test_durable_queue.py` checks each touchpoint, so that an upgrade that moves one fails
there. A public `DurableDeployment.queue_position(run_id)` (or the store exposing its runnable index) and a store
`delete(run_id)` for finished executions would remove it. `forget` deletes what the store's own expiry deletes: the
memory store's `_expire_control` (given a time past every deadline), and in Redis the keys the store sets to expire
when a job finishes (its monitoring index drops a job whose control is gone when it next lists).

Order: the memory store claims the due job with the lowest (score, id), the score being its submission time, so the
jobs ahead of a queued one are exactly those before it in that order. The Redis store claims at random among the
oldest due jobs; there the count (the jobs submitted before it and still queued) is an estimate.
"""

import sys
from dataclasses import dataclass

from fastapi import FastAPI
from hayhooks.durable.engine import PayloadKind
from hayhooks.durable.runtime import DurableDeployment
from hayhooks.durable.store import ExecutionStore, MemoryExecutionStore


@dataclass(frozen=True)
class QueueState:
    """Where a queued job stands: queued jobs before it, and the jobs running now (in every replica)."""

    queued_ahead: int
    running: int

    @property
    def ahead(self) -> int:
        """The jobs that start or run before this one."""
        return self.queued_ahead + self.running


def deployment(app: FastAPI, name: str) -> DurableDeployment | None:
    """The durable deployment of pipeline `name`, or None (not in durable mode, or not deployed yet)."""
    runtime = getattr(app.state, "durable_runtime", None)
    return None if runtime is None else runtime._deployments.get(name)


async def queue_state(durable: DurableDeployment, run_id: str) -> QueueState | None:
    """Where `run_id` stands in its revision's queue; None when it is not waiting there (running, or finished)."""
    store: ExecutionStore = durable.store
    if isinstance(store, MemoryExecutionStore):
        runnable = store._runnable
        if run_id not in runnable:
            return None
        mine = (runnable[run_id], run_id)
        ahead = sum(
            1
            for other, score in runnable.items()
            if (score, other) < mine and store._controls[other].definition_revision == durable.revision
        )
    else:
        rank = await store.redis.zrank(store.keys.runnable_revision(durable.revision), run_id)
        if rank is None:
            return None
        ahead = int(rank)
    counts = await store.operational_counts(revision=durable.revision)
    running = max(0, counts["revision_nonterminal"] - counts["revision_runnable"])
    return QueueState(queued_ahead=ahead, running=running)


async def forget(durable: DurableDeployment, run_id: str) -> None:
    """Delete a finished job from the job store now, as its expiry would later (an unfinished one is left alone)."""
    store: ExecutionStore = durable.store
    if isinstance(store, MemoryExecutionStore):
        store._expire_control(run_id, sys.maxsize)  # only a finished job has a cleanup entry to expire
        return
    control = await store.read_control(run_id)
    if control is None or not control.terminal:
        return
    keys = store.keys
    await store.redis.delete(
        keys.control(run_id),
        keys.progress(run_id),
        keys.chunks(run_id),
        *(keys.payload(run_id, kind) for kind in PayloadKind),
        keys.idempotency(control.idempotency_digest),
    )
