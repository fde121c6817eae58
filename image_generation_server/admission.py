"""
Admission: a cap on concurrent generations with a bounded wait queue, the serving layer's answer to overload.

Thread-safe, so one gate bounds callers on any thread and any event loop together.
"""

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from components.errors import ServerBusyError


class AdmissionGate:
    """Lets `max_concurrency` callers in at a time and `max_queue` more wait, in order of arrival; refuses more."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._free = max_concurrency
        self._waiters: deque[threading.Event | tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one slot for the duration of the block (this thread waits while queued), or raise `ServerBusyError`."""
        event = threading.Event()
        if self._enter(event):
            event.wait()
        try:
            yield
        finally:
            self._release()

    @asynccontextmanager
    async def slot_async(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block (awaiting while queued), or raise `ServerBusyError`."""
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        if self._enter(waiter):
            try:
                await waiter[1]
            except asyncio.CancelledError:
                with self._lock:
                    queued = waiter in self._waiters
                    if queued:
                        self._waiters.remove(waiter)
                if not queued and waiter[1].done() and not waiter[1].cancelled():
                    self._release()  # the slot was handed over just as we were cancelled: pass it on
                raise  # else a hand-over still in transit finds the future cancelled and passes the slot on
        try:
            yield
        finally:
            self._release()

    def _enter(self, waiter: threading.Event | tuple[asyncio.AbstractEventLoop, asyncio.Future]) -> bool:
        """Take a free slot (False), or queue `waiter` (True); refuse when the queue is full."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return False
            if len(self._waiters) >= self.max_queue:
                raise ServerBusyError("too many image requests in flight", retry_after=self.retry_after)
            self._waiters.append(waiter)
            return True

    def _release(self) -> None:
        """Hand the slot to the first waiter, or free it."""
        with self._lock:
            if not self._waiters:
                self._free += 1
                return
            waiter = self._waiters.popleft()
        if isinstance(waiter, threading.Event):
            waiter.set()
        else:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(self._hand_over, future)
            except RuntimeError:  # its loop is closed: nobody is waiting there any more
                self._release()

    def _hand_over(self, future: asyncio.Future) -> None:
        if future.done():  # cancelled while the slot was on its way
            self._release()
        else:
            future.set_result(None)
