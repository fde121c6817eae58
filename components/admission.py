"""A cap on concurrent upstream calls with a bounded wait queue: when both are full, refuse at once."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from components.errors import ServerBusyError


class AdmissionGate:
    """Lets `max_concurrency` callers in at a time and `max_queue` more wait; refuses the rest."""

    def __init__(self, max_concurrency: int, max_queue: int, retry_after: int = 1) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.in_flight = 0
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(max_concurrency)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block, or raise `ServerBusyError`."""
        if self._semaphore.locked() and self.waiting >= self.max_queue:
            raise ServerBusyError("too many image requests in flight", retry_after=self.retry_after)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._semaphore.release()
