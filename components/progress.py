"""
Progress of the generation running in this context: whoever runs it may set a callback that receives its events.

Events are small JSON-safe dicts: `{"phase": "queued"}`, `{"phase": "sent"}` (API backend: the request went
upstream), `{"phase": "generating"}` (local backend: the device is ours), `{"phase": "step", "step": k, "steps": n}`
(local backend, once per denoising step), `{"phase": "preview", ...}` (local backend, when previews are asked for:
see `reporting_to`), `{"phase": "received"}` (the image bytes are here). The callback runs in the
thread that reports (the event loop, or a worker thread: context variables follow `asyncio.to_thread`); an exception
it raises, such as a cancellation, stops the generation.

Observers (`observe`) receive every event of every generation in the process, for counting (the server's metrics).
Some events are only of use to them; a callback ignores phases it does not know. Every event is small and names no
prompt, token or URL:
- `queued`, `sent`/`generating` with `waited` (seconds in the queue), `received` with `seconds` (upstream or local
  generation), `released` (the slot is free again, whatever happened);
- `upstream`: one HTTP call to the upstream, with `status` (its status code, or `timeout` / `error`) and `seconds`;
- `cache` with `hit` (a pinned-seed lookup) and `bytes` (what the cache holds); `coalesced` (a request joined an
  identical one in flight);
- `finished`: an image is ready, with `model` (a served model id, else `other`), `width`, `height`, `format` and
  `seconds` (post-processing);
- `denoised` (local backend): `steps` in `seconds`; then, on CUDA, `device_memory` with `device_memory_bytes` and
  `device_memory_peak_bytes` (`torch.cuda.memory_allocated()` and its peak).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

ProgressCallback = Callable[[dict[str, Any]], None]

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

    With `previews`, a backend that can show a generation in progress (the local one) also reports that many
    `{"phase": "preview", "index": i, "previews": n, "step": k, "steps": total, "image": <base64>, "mime_type": ...,
    "width": w, "height": h}` events per image, at evenly spaced steps (fewer when there are too few steps): a small
    image of the latents at that step, in the request's output format. A backend that cannot sends none.
    """
    token, wanted = _callback.set(callback), _previews.set(previews)
    try:
        yield
    finally:
        _previews.reset(wanted)
        _callback.reset(token)
