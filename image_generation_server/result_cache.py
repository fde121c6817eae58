"""Reuse of seeded results: an LRU bounded in bytes, and coalescing of identical requests in flight."""

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from contextvars import ContextVar
from typing import Generic, TypeVar

from image_generation_server import progress

T = TypeVar("T")

# Who may share a cached or coalesced result: requests with different scopes never do. A server sets it per request
# (the HTTP guard: a hash of the caller's API key); empty, the default, is one scope for everyone.
CACHE_SCOPE: ContextVar[str] = ContextVar("image_generation_cache_scope", default="")


class ByteBudgetLRU(Generic[T]):
    """A least-recently-used map whose values' sizes never add up to more than `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._items: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> T | None:
        """The value stored under `key`, now the most recently used, or None."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: T, size: int) -> None:
        """Store `value`, evicting the least recently used entries; a value larger than the budget is not kept."""
        if size > self.max_bytes or not self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.size_bytes -= old[1]
            self._items[key] = (value, size)
            self.size_bytes += size
            while self.size_bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.size_bytes -= evicted


class Coalescer(Generic[T]):
    """Runs one task per key for every concurrent caller; the task is cancelled when its last caller leaves."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, tuple[asyncio.Task[T], list[int]]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, key: Hashable, factory: Callable[[], Awaitable[T]]) -> T:
        """Await the shared result of `factory()` for `key`, starting it if no caller has."""
        entry = self._tasks.get(key)
        if entry is None:
            task = asyncio.ensure_future(factory())
            entry = (task, [0])
            self._tasks[key] = entry
            task.add_done_callback(lambda _: self._tasks.pop(key, None))
        else:
            progress.report({"phase": "coalesced"})
        task, waiters = entry
        waiters[0] += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and waiters[0] == 1:
                task.cancel()
            raise
        finally:
            waiters[0] -= 1
