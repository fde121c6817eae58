"""
Hayhooks' private (or internal) parts this service relies on, one function per touchpoint.

- **Process-wide settings.** Hayhooks' `create_app()` reads only its `hayhooks.settings.settings` object, so our
  defaults are written there before the app is built (`set_hayhooks_settings`, `default_hayhooks_settings`).
- **Its log.** Our log keeps Hayhooks' format and its stdlib bridge (`hayhooks.server.logger`), and drops the INFO
  lines Hayhooks logs for each run, found by the module and function that log them (`PER_RUN_CHATTER`).
- **Its status answer.** The operator's `GET /status` is Hayhooks' whole answer (`hayhooks.server.routers.status`)
  behind its own access check (`hayhooks.dashboard_auth`).
- **Durable internals.** There is no public way to reach a deployment's execution store from the app, to ask how many
  jobs are queued ahead of one, or to delete a finished job: `DurableRuntime._deployments`,
  `MemoryExecutionStore._runnable`, `_controls` and `_expire_control`, and the Redis store's runnable index are read
  here. `forget` deletes what the store's own expiry deletes: the memory store's `_expire_control` (given a time past
  every deadline), and in Redis the keys the store sets to expire when a job finishes (its monitoring index drops a
  job whose control is gone when it next lists). The memory store claims the due job with the lowest (score, id),
  the score being its submission time, so the jobs ahead of a queued one are exactly those before it in that order;
  the Redis store claims at random among the oldest due jobs, so there the count is an estimate.

docs/upstream.md says why each is needed and the upstream change that would remove it; tests/test_upstream.py and
tests/test_durable_queue.py check each touchpoint, so that an upgrade that moves one fails there by name.
"""

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from hayhooks import log
from hayhooks.dashboard_auth import require_tracing_access
from hayhooks.durable.engine import PayloadKind
from hayhooks.durable.runtime import DurableDeployment
from hayhooks.durable.store import ExecutionStore, MemoryExecutionStore
from hayhooks.server.logger import formatter, intercept_stdlib_logging
from hayhooks.server.routers.status import StatusResponse, status_all
from hayhooks.settings import settings

# Hayhooks' run route handler: its INFO lines are per-request chatter beside the access log.
PER_RUN_CHATTER = ("hayhooks.server.utils.deploy_utils", "_handle_request")


def set_hayhooks_settings(**values: Any) -> None:
    """Set fields of Hayhooks' process-wide settings (read when its app is built)."""
    for name, value in values.items():
        setattr(settings, name, value)


def default_hayhooks_settings(**values: Any) -> None:
    """Set the fields of Hayhooks' process-wide settings that its environment (or a caller) left unset."""
    set_hayhooks_settings(**{name: value for name, value in values.items() if name not in settings.model_fields_set})


def add_stderr_log(level: str, *, per_run_chatter: bool) -> None:
    """A log handler on stderr in Hayhooks' format; Hayhooks' per-run INFO lines left out unless `per_run_chatter`."""
    log.add(sys.stderr, level=level, format=formatter, filter=None if per_run_chatter else _not_per_run_chatter)


def skip_per_run_chatter() -> None:
    """Skip Hayhooks' per-run lines at the call, before loguru builds them (its run module logs nothing else then)."""
    log.disable(PER_RUN_CHATTER[0])


def _not_per_run_chatter(record: dict[str, Any]) -> bool:
    return (record["name"], record["function"]) != PER_RUN_CHATTER or record["level"].no > logging.INFO


def log_through_hayhooks(loggers: Sequence[str] | None = None) -> None:
    """
    Send the stdlib `loggers` through Hayhooks' log.

    By default those its settings name (Uvicorn's), with its excluded access-log paths, as Hayhooks' own `run` does.
    """
    if loggers is None:
        intercept_stdlib_logging(
            settings.intercepted_loggers, access_log_excluded_path_prefixes=settings.access_log_excluded_path_prefixes
        )
    else:
        intercept_stdlib_logging(list(loggers))


async def hayhooks_status(request: Request) -> StatusResponse:
    """Hayhooks' own `GET /status` answer: job slots, the job store's counts, every deployment's health."""
    return await status_all(request)


def is_operator(request: Request) -> bool:
    """Whether the request passes Hayhooks' access check for its dashboard (`HAYHOOKS_TRACING_TOKEN`)."""
    try:
        require_tracing_access(request)
    except HTTPException:
        return False
    return True


@dataclass(frozen=True)
class QueueState:
    """Where a queued job stands: queued jobs before it, and the jobs running now (in every replica)."""

    queued_ahead: int
    running: int

    @property
    def ahead(self) -> int:
        """The jobs that start or run before this one."""
        return self.queued_ahead + self.running


def durable_deployment(app: FastAPI, name: str) -> DurableDeployment | None:
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
