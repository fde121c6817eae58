"""
The progress bus: every event of every generation in this process, to the observers and to the run's own callback.

The serving layer (`image_generation_server.serving`) reports its events here and passes `report` to the generator
as its `progress_callback` (`components.progress`), so the generator's events (`upstream`, `step`, `denoised`,
`device_memory`, `received`) come here too. Whoever runs a generation may set a callback for it (`reporting_to`: a
job's progress); it runs in the thread that reports (context variables follow `asyncio.to_thread`), and an
exception it raises, such as a cancellation, stops the generation. Observers (`observe`) receive every event, for
counting (the server's metrics); a callback ignores phases it does not know. The serving layer's events:
- `queued`, `sent` (API backend: the request goes upstream) or `generating` (local backend: the device is ours) with
  `waited` (seconds in the queue), `released` (the slot is free again, whatever happened, with `admitted`);
- `cache` with `hit` (a pinned-seed lookup) and `bytes` (what the cache holds); `coalesced` (a request joined an
  identical one in flight);
- `finished`: an image is ready, with `model` (a served model id, else `other`), `width`, `height`, `format` and
  `seconds` (from its bytes' arrival: checking, converting, marking and signing).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from components.progress import ProgressCallback

_callback: ContextVar[ProgressCallback | None] = ContextVar("image_generation_progress", default=None)
_previews: ContextVar[int] = ContextVar("image_generation_previews", default=0)
_observers: list[ProgressCallback] = []


def observe(observer: ProgressCallback) -> None:
    """Send every event of this process to `observer` from now on (once, however often it is passed here)."""
    if observer not in _observers:
        _observers.append(observer)


def report(event: dict[str, Any]) -> None:
    """Pass `event` to every observer, then to the callback set in this context, if any."""
    for observer in _observers:
        observer(event)
    callback = _callback.get()
    if callback is not None:
        callback(event)


def previews_wanted() -> int:
    """How many previews the callback set in this context asked for (0 without one)."""
    return _previews.get() if _callback.get() is not None else 0


@contextmanager
def reporting_to(callback: ProgressCallback, previews: int = 0) -> Iterator[None]:
    """
    Send the progress of generations run inside this block to `callback`.

    With `previews`, the generator is asked for that many `preview` events per image (`components.progress`); a
    backend that cannot make them sends none.
    """
    token, wanted = _callback.set(callback), _previews.set(previews)
    try:
        yield
    finally:
        _previews.reset(wanted)
        _callback.reset(token)
