"""A cap on the bytes every call of one component holds while reading replies; thread-safe."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from components.errors import ServerBusyError


class ByteBudget:
    """A cap on the bytes all calls hold while reading replies; `lease()` tracks one request's share."""

    def __init__(self, max_bytes: int, retry_after: int = 1) -> None:
        self.max_bytes = max_bytes
        self.retry_after = retry_after
        self.in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator["ByteLease"]:
        """A lease returned in full when the block ends."""
        lease = ByteLease(self)
        try:
            yield lease
        finally:
            with self._lock:
                self.in_use -= lease.held

    def _take(self, n: int) -> None:
        with self._lock:
            if self.in_use + n > self.max_bytes:
                raise ServerBusyError("too many bytes in flight", retry_after=self.retry_after)
            self.in_use += n


class ByteLease:
    """One request's bytes in flight."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, n: int) -> None:
        """Count `n` more bytes, or raise `ServerBusyError` when the budget has no room for them."""
        self.budget._take(n)
        self.held += n
