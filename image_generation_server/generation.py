"""
The one runner every door uses: the image pipeline that Hayhooks deployed, run on a request's parameters.

The native route's wrapper calls `run_pipeline` on its own pipeline; the other doors (OpenAI images, MCP) reach the
same wrapper, and so the same pipeline instance, cache, coalescing and admission queue, through Hayhooks' registry.
Failures are raised as they come; each door maps them with `image_generation_server.responses.classify`.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.dataclasses import ImageContent

from components import progress
from components.errors import PipelineNotServedError
from image_generation_server.settings import load_settings

PIPELINE_NAME = "image_generation"  # the folder the wrapper is deployed from, hence its route /image_generation/run
COMPONENT = "text_to_image"
EDIT_PIPELINE_NAME = "image_editing"  # pipelines/image_editing/, its route /image_editing/run
EDIT_COMPONENT = "image_to_image"


def load_backend_pipeline(files: dict[str, Path]) -> Pipeline:
    """
    The serialized pipeline of the settings' backend (one of `files`' keys), loaded and warmed up.

    Haystack may deserialize our `components` only. Settings errors and model loading fail here, at startup.
    """
    allow_deserialization_module("components")
    pipeline = Pipeline.loads(files[load_settings().backend].read_text())
    pipeline.warm_up()
    return pipeline


async def run_pipeline(pipeline: Pipeline, component: str = COMPONENT, **params: Any) -> list[ImageContent]:
    """Run an image pipeline; returns its images (one per `n`, in seed order). `None` means the default."""
    # Haystack deep-copies every input several times per run: the defaults (`None`) are left out, not copied.
    result = await pipeline.run_async({component: {name: value for name, value in params.items() if value is not None}})
    return result[component]["images"]


def served_pipeline(app: FastAPI, name: str = PIPELINE_NAME) -> Pipeline:
    """The pipeline of the deployed wrapper `name`; `PipelineNotServedError` when none is deployed."""
    wrapper = app.state.pipeline_registry.get(name)
    pipeline = getattr(wrapper, "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise PipelineNotServedError(f"no pipeline named {name} is deployed")
    return pipeline


async def generate(app: FastAPI, **params: Any) -> list[ImageContent]:
    """Run the served image pipeline: `params` are the component's run inputs (`prompt`, ..., `n`)."""
    return await run_pipeline(served_pipeline(app), **params)


Runner = Callable[..., Awaitable[list[ImageContent]]]


async def generate_watched(
    app: FastAPI, phases: frozenset[str], previews: int = 0, run: Runner | None = None, **params: Any
) -> AsyncIterator[dict[str, Any] | list[ImageContent]]:
    """
    Run a served image pipeline, yielding its progress events of `phases`, then its images.

    `run` is `generate` (the default) or `edit`, with `params` as its inputs. Events come as they happen (see
    `components.progress`; `previews` asks the backend for that many `preview` events per image). A failure is
    raised where the images would come. Closing the iterator early cancels the generation (a local one stops at its
    next step). The events are bounded by the generation: its steps and previews.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def report(event: dict[str, Any]) -> None:  # on the event loop, or in the thread that generates
        if event["phase"] in phases:
            loop.call_soon_threadsafe(events.put_nowait, event)

    with progress.reporting_to(report, previews=previews):  # the task inherits it
        task = asyncio.ensure_future((run or generate)(app, **params))
    try:
        while not task.done():
            event = asyncio.ensure_future(events.get())
            await asyncio.wait((event, task), return_when=asyncio.FIRST_COMPLETED)
            if not event.done():
                event.cancel()
                break
            yield event.result()
        while not events.empty():  # reported before the generation ended (same loop, first in first out)
            yield events.get_nowait()
        yield await task
    finally:
        task.cancel()


async def edit(app: FastAPI, **params: Any) -> list[ImageContent]:
    """Run the served editing pipeline: `params` are its component's run inputs (`image`, `mask`, `prompt`, ...)."""
    return await run_pipeline(served_pipeline(app, EDIT_PIPELINE_NAME), EDIT_COMPONENT, **params)


def image_size(pipeline: Pipeline, width: int | None, height: int | None) -> tuple[int, int]:
    """The size a request's images get: its own width and height, else the pipeline's defaults."""
    defaults = pipeline.get_component(COMPONENT).defaults
    return width or defaults.width, height or defaults.height


def served_models(app: FastAPI) -> list[str]:
    """The model ids a request may ask for: the allow-list when there is one, else the default model."""
    return served_pipeline(app).get_component(COMPONENT).served_models()
