"""
What a generator tells its caller while it works: the `progress_callback` that `run` and `run_async` take.

The callback receives small JSON-safe dicts that name no prompt, token or URL, in the thread that reports them (the
event loop, or the worker thread of a local generation). An exception it raises stops the generation there: a
caller cancels a local generation at its next step that way. Without a callback nothing is reported.
- `upstream` (API backend): one HTTP call, with `status` (its status code, or `timeout` / `error`) and `seconds`;
- `step` (local backend): `step` of `steps` denoising steps done; `denoised`: `steps` in `seconds`; then, on CUDA,
  `device_memory` with `device_memory_bytes` and `device_memory_peak_bytes`;
- `preview` (local backend, when the run asks for `previews`): `{"phase": "preview", "index": i, "previews": n,
  "step": k, "steps": total, "image": <base64>, "mime_type": ..., "width": w, "height": h}`, a small image of the
  latents at that step in the request's output format (this one is not small, and is the one exception);
- `received`: the image's bytes are here, `seconds` after the call or the generation started.
"""

from collections.abc import Callable
from typing import Any

ProgressCallback = Callable[[dict[str, Any]], None]


def ignore(event: dict[str, Any]) -> None:
    """The callback of a run given none."""
