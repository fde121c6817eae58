"""
Progress of the generation running in this context: whoever runs it may set a callback that receives its events.

Events are small JSON-safe dicts: `{"phase": "queued"}`, `{"phase": "sent"}` (API backend: the request went
upstream), `{"phase": "generating"}` (local backend: the device is ours), `{"phase": "step", "step": k, "steps": n}`
(local backend, once per denoising step), `{"phase": "received"}` (the image bytes are here). The callback runs in the
thread that reports (the event loop, or a worker thread: context variables follow `asyncio.to_thread`); an exception
it raises, such as a cancellation, stops the generation.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

ProgressCallback = Callable[[dict[str, Any]], None]

_callback: ContextVar[ProgressCallback | None] = ContextVar("image_generation_progress", default=None)


def report(event: dict[str, Any]) -> None:
    """Pass `event` to the callback set in this context, if any."""
    callback = _callback.get()
    if callback is not None:
        callback(event)


@contextmanager
def reporting_to(callback: ProgressCallback) -> Iterator[None]:
    """Send the progress of generations run inside this block to `callback`."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)
