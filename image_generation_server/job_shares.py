"""
Fair shares of the job queue, and where a queued job stands.

Hayhooks bounds all jobs together (`HAYHOOKS_DURABLE_MAX_NONTERMINAL_EXECUTIONS`) and all progress streams of a
replica together (with Redis, `HAYHOOKS_DURABLE_REDIS_MAX_VIEWERS` connections): alone, one client could take them
all. `JobShares`, in front of the job routes (after `HTTPGuard`, which names the client: its API key, or its address
with keys off), gives each client a share below them:

- at most `IMAGE_GENERATION_MAX_JOBS_PER_CLIENT` unfinished (queued or running) jobs: past it, a submission is a 429
  that names the limit. The client's unfinished jobs are counted from a ledger of the ids it submitted (in this
  process, or in Redis with the Redis job store, so that replicas share it), each checked against the job store.
- at most `IMAGE_GENERATION_MAX_STREAMS_PER_CLIENT` open progress streams per replica: past it, a 429.
- at most `IMAGE_GENERATION_MAX_FINISHED_JOBS_PER_CLIENT` finished jobs are kept: when it submits another, the
  oldest beyond that are deleted from the job store (their status is then a 404). Every finished job is kept no
  longer than its images anyway (`image_generation_server.jobs.configure_durable_mode`).
- its `Idempotency-Key` is its own: the key is scoped to the client before Hayhooks sees it, so that with API keys off
  one client can neither replay nor block another's (with keys on, Hayhooks scopes it to the key already).

A queued job's status (`GET executions/{id}`) carries `queue`: `{"ahead": 2, "estimated_start_seconds": 20}`, the
jobs that start or run before it, and when it should start from the recent jobs' durations (null before any job
finished here). Its stream sends the same as `event: queue` whenever it changes, until the job starts.
"""

import asyncio
import collections
import hashlib
import json
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI
from hayhooks import log
from hayhooks.durable.runtime import DurableDeployment
from hayhooks.settings import settings as hayhooks_settings
from redis import asyncio as redis
from redis.exceptions import RedisError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_generation_server import private_hayhooks
from image_generation_server.quota import IDENTITY_SCOPE_KEY
from image_generation_server.responses import error_response
from image_generation_server.settings import env_name

LEDGER_KEY_PREFIX = "image-generation:jobs"
MAX_MEMORY_IDENTITIES = 65536  # the in-process ledger forgets the least recently seen clients beyond this
REDIS_TIMEOUT = 0.5
RECENT_JOBS = 20  # how many of the latest job durations the estimate averages
QUEUE_POLL_SECONDS = 1.0  # how often an open stream of a queued job looks at its place
JOB_RETRY_AFTER_SECONDS = 5
MAX_IDEMPOTENCY_KEY_BYTES = 512  # Hayhooks refuses longer keys (422)


class RecentDurations:
    """The durations of the latest jobs that finished in this process."""

    def __init__(self, size: int = RECENT_JOBS) -> None:
        self._seconds: collections.deque[float] = collections.deque(maxlen=size)

    def record(self, seconds: float) -> None:
        """Add one finished job's duration."""
        self._seconds.append(seconds)

    def mean(self) -> float | None:
        """Their mean, or None before any job finished."""
        return sum(self._seconds) / len(self._seconds) if self._seconds else None


JOB_DURATIONS = RecentDurations()


def queue_answer(state: private_hayhooks.QueueState) -> dict[str, int | None]:
    """What a client is told about its queued job: the jobs before it, and about when it starts."""
    mean = JOB_DURATIONS.mean()
    slots = max(1, state.running)  # while jobs wait, every slot is busy: the jobs running are the slots
    estimate = None if mean is None else math.ceil(state.ahead * mean / slots)
    return {"ahead": state.ahead, "estimated_start_seconds": estimate}


class Ledger(Protocol):
    """The ids of the jobs each client submitted: those that may be unfinished, and the finished ones, oldest first."""

    async def unfinished(self, client: str) -> list[str]:
        """The ids of `client`'s jobs not yet seen finished."""
        ...

    async def add(self, client: str, run_id: str) -> None:
        """Record a job `client` submitted."""
        ...

    async def finish(self, client: str, finished: list[str], gone: list[str], keep: int) -> list[str]:
        """
        Move `finished` jobs to the client's finished ones and forget `gone` ones.

        Returns the oldest finished jobs beyond `keep`, forgotten here: the caller deletes them from the job store.
        """
        ...


class MemoryLedger:
    """The ledger in this process, for at most `MAX_MEMORY_IDENTITIES` clients."""

    def __init__(self) -> None:
        self._jobs: collections.OrderedDict[str, tuple[list[str], list[str]]] = collections.OrderedDict()

    async def unfinished(self, client: str) -> list[str]:
        """The ids of `client`'s jobs not yet seen finished."""
        return list(self._jobs.get(client, ([], []))[0])

    async def add(self, client: str, run_id: str) -> None:
        """Record a job (the event loop is the only writer: no lock)."""
        self._jobs.setdefault(client, ([], []))[0].append(run_id)
        self._jobs.move_to_end(client)
        if len(self._jobs) > MAX_MEMORY_IDENTITIES:
            self._jobs.popitem(last=False)

    async def finish(self, client: str, finished: list[str], gone: list[str], keep: int) -> list[str]:
        """Move, forget, and return the finished jobs beyond `keep`."""
        open_jobs, done = self._jobs.setdefault(client, ([], []))
        open_jobs[:] = [run_id for run_id in open_jobs if run_id not in finished and run_id not in gone]
        done.extend(finished)
        dropped = done[: max(0, len(done) - keep)]
        del done[: len(dropped)]
        return dropped


class RedisLedger:
    """The ledger in Redis: per client a set of unfinished ids and a list of finished ones, expiring with the jobs."""

    def __init__(self, url: str, ttl_seconds: int) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
        self.ttl_seconds = ttl_seconds

    @staticmethod
    def _keys(client: str) -> tuple[str, str]:
        return f"{LEDGER_KEY_PREFIX}:{client}:open", f"{LEDGER_KEY_PREFIX}:{client}:finished"

    async def unfinished(self, client: str) -> list[str]:
        """SMEMBERS."""
        return [member.decode() for member in await self.client.smembers(self._keys(client)[0])]

    async def add(self, client: str, run_id: str) -> None:
        """SADD and EXPIRE in one transaction."""
        key = self._keys(client)[0]
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.sadd(key, run_id).expire(key, self.ttl_seconds).execute()

    async def finish(self, client: str, finished: list[str], gone: list[str], keep: int) -> list[str]:
        """SREM, RPUSH, then LPOP beyond `keep`, in one transaction."""
        open_key, done_key = self._keys(client)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(open_key, *finished, *gone)
            if finished:
                pipe.rpush(done_key, *finished).expire(done_key, self.ttl_seconds)
            pipe.llen(done_key)
            length = (await pipe.execute())[-1]
        if length <= keep:
            return []
        return [member.decode() for member in await self.client.lpop(done_key, length - keep) or []]


class JobShares:
    """
    ASGI middleware in front of the job routes of every durable pipeline: each client's share of jobs and streams.

    A client's jobs are counted per pipeline (image generation, image editing: each has its own job limit in
    Hayhooks); its open streams across them (a replica's streams share one pool).
    """

    def __init__(self, app: ASGIApp, api: FastAPI, max_jobs: int, max_streams: int, max_finished: int) -> None:
        self.app = app
        self.api = api
        self.max_jobs = max_jobs
        self.max_streams = max_streams
        self.max_finished = max_finished
        self.ledger: Ledger = (
            RedisLedger(hayhooks_settings.durable_redis_url, hayhooks_settings.durable_terminal_ttl_seconds)
            if hayhooks_settings.durable_store == "redis"
            else MemoryLedger()
        )
        self.streams: collections.Counter[str] = collections.Counter()
        self._submitting: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Apply the client's share to a submission or a stream; add the queue to a queued job's status."""
        path = scope.get("path", "") if scope["type"] == "http" else ""
        client = scope.get(IDENTITY_SCOPE_KEY)
        name, *parts = path.removeprefix("/").split("/")
        durable = private_hayhooks.durable_deployment(self.api, name) if parts else None
        if durable is None or client is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and parts == ["run-durable"]:
            await self._submit(scope, receive, send, durable, f"{name}:{client}")
        elif scope["method"] == "GET" and len(parts) == 3 and parts[0] == "executions" and parts[2] == "stream":
            await self._stream(scope, receive, send, durable, client, parts[1])
        elif scope["method"] == "GET" and len(parts) == 2 and parts[0] == "executions":
            await self._status(scope, receive, send, durable, parts[1])
        else:
            await self.app(scope, receive, send)

    async def _submit(
        self, scope: Scope, receive: Receive, send: Send, durable: DurableDeployment, client: str
    ) -> None:
        lock = self._submitting.get(client) or asyncio.Lock()
        self._submitting[client] = lock  # kept while a submission of the client holds or awaits it
        async with lock:  # one submission of a client at a time: the count cannot be raced in this process
            try:
                unfinished = await self._unfinished(durable, client)
            except (RedisError, OSError) as e:  # the job store's own check answers for a store that is away
                log.warning("Job ledger unreachable ({}): the client's share is not checked", type(e).__name__)
                unfinished = []
            if len(unfinished) >= self.max_jobs:
                limit = f"{env_name('max_jobs_per_client')}={self.max_jobs}"
                share = f"{len(unfinished)} unfinished jobs, its limit ({limit})"
                await _over_share(share, "retry when one has finished", scope, receive, send)
                return
            answer = _Captured(send)
            await self.app(_scoped_idempotency(scope, client), receive, answer.send)
            if run_id := answer.created_job():
                try:
                    await self.ledger.add(client, run_id)
                except (RedisError, OSError) as e:
                    log.warning("Job ledger unreachable ({}): a job is not counted", type(e).__name__)

    async def _unfinished(self, durable: DurableDeployment, client: str) -> list[str]:
        """The client's jobs that are queued or running; its finished ones beyond its share are deleted."""
        recorded = await self.ledger.unfinished(client)
        controls = await asyncio.gather(*(durable.store.read_control(run_id) for run_id in recorded))
        finished = [run_id for run_id, control in zip(recorded, controls, strict=True) if control and control.terminal]
        gone = [run_id for run_id, control in zip(recorded, controls, strict=True) if control is None]
        if finished or gone:
            for run_id in await self.ledger.finish(client, finished, gone, self.max_finished):
                await private_hayhooks.forget(durable, run_id)
        return [run_id for run_id in recorded if run_id not in finished and run_id not in gone]

    async def _stream(  # noqa: PLR0913
        self, scope: Scope, receive: Receive, send: Send, durable: DurableDeployment, client: str, run_id: str
    ) -> None:
        if self.streams[client] >= self.max_streams:
            limit = f"{env_name('max_streams_per_client')}={self.max_streams}"
            share = f"{self.streams[client]} progress streams open, its limit ({limit})"
            await _over_share(share, "close one, or poll the job", scope, receive, send)
            return
        self.streams[client] += 1
        try:
            await _QueueEvents(durable, run_id, send).run(lambda wrapped: self.app(scope, receive, wrapped))
        finally:
            self.streams[client] -= 1
            if not self.streams[client]:
                del self.streams[client]

    async def _status(
        self, scope: Scope, receive: Receive, send: Send, durable: DurableDeployment, run_id: str
    ) -> None:
        answer = _Captured(None)
        await self.app(scope, receive, answer.send)
        if not answer.start:
            return
        body = answer.body
        if answer.status == 200:
            try:
                execution = json.loads(body)
                state = await private_hayhooks.queue_state(durable, run_id) if execution["status"] == "queued" else None
            except Exception as e:  # the answer stands as Hayhooks gave it
                log.debug("Job queue state not added: {}", type(e).__name__)
            else:
                if state is not None:
                    body = json.dumps({**execution, "queue": queue_answer(state)}, separators=(",", ":")).encode()
        headers = MutableHeaders(raw=list(answer.start["headers"]))
        headers["content-length"] = str(len(body))
        await send({**answer.start, "headers": headers.raw})
        await send({"type": "http.response.body", "body": body})


def _scoped_idempotency(scope: Scope, client: str) -> Scope:
    """The request with its `Idempotency-Key` scoped to `client` (one over 512 bytes is left to Hayhooks' 422)."""
    scoped = [
        (name, hashlib.sha256(client.encode() + b"\0" + value).hexdigest().encode())
        if name == b"idempotency-key" and 0 < len(value) <= MAX_IDEMPOTENCY_KEY_BYTES
        else (name, value)
        for name, value in scope["headers"]
    ]
    return {**scope, "headers": scoped}


class _Captured:
    """An answer read whole (passed on to `send` as it comes when `send` is given)."""

    def __init__(self, send: Send | None) -> None:
        self._send = send
        self.start: Message = {}
        self.chunks: list[bytes] = []

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
        if self._send is not None:
            await self._send(message)

    @property
    def status(self) -> int:
        return int(self.start.get("status", 0))

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def created_job(self) -> str | None:
        """The id of the job a submission created (202, not a replay), else None."""
        headers = dict(self.start.get("headers", []))
        if self.status != 202 or headers.get(b"idempotent-replay") == b"true":
            return None
        try:
            return str(json.loads(self.body)["execution_id"])
        except (ValueError, KeyError, TypeError):
            return None


class _QueueEvents:
    """A job's stream, with `event: queue` sent whenever the queued job's place changes, until it starts."""

    def __init__(self, durable: DurableDeployment, run_id: str, send: Send) -> None:
        self.durable = durable
        self.run_id = run_id
        self._send = send
        self._lock = asyncio.Lock()
        self._streaming = asyncio.Event()
        self._ended = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            await self._send(message)
            if message["type"] == "http.response.start" and message["status"] == 200:
                self._streaming.set()
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self._ended = True

    async def run(self, stream: Callable[[Send], Awaitable[None]]) -> None:
        """Run the stream, and the watch of the job's place beside it."""
        watch = asyncio.ensure_future(self._watch())
        try:
            await stream(self.send)
        finally:
            watch.cancel()

    async def _watch(self) -> None:
        await self._streaming.wait()
        last: dict[str, Any] | None = None
        while True:
            try:
                state = await private_hayhooks.queue_state(self.durable, self.run_id)
            except Exception as e:  # the store is away: the stream itself reports that
                log.debug("Job queue state not read: {}", type(e).__name__)
                answer = last
            else:
                if state is None:
                    return
                answer = queue_answer(state)
            if answer != last:
                last = answer
                event = f"event: queue\ndata: {json.dumps(answer, separators=(',', ':'))}\n\n".encode()
                async with self._lock:
                    if self._ended:
                        return
                    await self._send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(QUEUE_POLL_SECONDS)


async def _over_share(share: str, remedy: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse a client over its share of jobs or streams: a 429 with `Retry-After` that names the limit."""
    message = f"this client has {share}: {remedy}"
    await error_response("native", 429, message, {"Retry-After": str(JOB_RETRY_AFTER_SECONDS)})(scope, receive, send)
