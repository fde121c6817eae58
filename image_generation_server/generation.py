"""
The one runner every door uses: the served image pipeline, and the serving layer around it.

The pipeline (`pipelines/image_generation.yml`, or `_local.yml`) is a plain Haystack pipeline: a text-to-image
generator, then `AIImageMarker`. What a serving process adds lives here, around each run, so that every door gets
it (the native route, the JSON variant, `/v1/images/generations`, MCP, jobs) and the components stay plain clients:
- admission: at most `max_concurrency` generations at once (one for a local model), `max_queue` more waiting in
  order; beyond, `ServerBusyError` (503 with `Retry-After`);
- the seeded cache: an image asked for with a seed is kept (an LRU bounded in bytes, and optionally Redis shared by
  replicas), per cache scope (`result_cache.CACHE_SCOPE`: the caller's API key), and identical seeded requests in
  flight share one run (coalescing);
- progress: every event goes to the process-wide bus (`image_generation_server.progress`), the generator's own
  through its `progress_callback`.
A batch of `n` is `n` runs of one image with seeds `seed, seed+1, ...`: image *i* is the image of seed `seed+i` alone,
byte for byte, and has its own cache entry.

There is one runner per process (`served_runner`): the wrappers that Hayhooks deploys (`pipelines/`, and the JSON
variant in `served/image_generation_json/`) share it, and the other doors reach it through Hayhooks' registry. The
editing pipeline (`pipelines/image_editing/`) runs through the same admission gate (`edit_images`); its edits are
not cached.
Failures are raised as they come; each door maps them with `image_generation_server.responses.classify`.
"""

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from hayhooks.settings import settings as hayhooks_settings
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.dataclasses import ImageContent

from components.errors import PipelineNotServedError
from components.request import GenerationRequest
from components.text_to_image_base import TextToImageBase
from image_generation_server import progress
from image_generation_server.admission import AdmissionGate
from image_generation_server.log import configure_server_log
from image_generation_server.private_haystack import skip_copying_immutable_values
from image_generation_server.result_cache import CACHE_SCOPE, ByteBudgetLRU, Coalescer
from image_generation_server.settings import Settings
from image_generation_server.shared_cache import SharedResultCache

PIPELINE_NAME = "image_generation"  # the folder the wrapper is deployed from, hence its route /image_generation/run
COMPONENT = "text_to_image"  # the generator in the pipeline
MARKER = "ai_image_marker"  # what marks its images, connected after it
EDIT_PIPELINE_NAME = "image_editing"  # pipelines/image_editing/, its route /image_editing/run
EDIT_COMPONENT = "image_to_image"
# The settings backend -> the serialized pipeline that serves it (in the wrapper's folder). Both take the same inputs.
PIPELINE_FILES = {"huggingface_api": "image_generation.yml", "local": "image_generation_local.yml"}
EDIT_PIPELINE_FILES = {"huggingface_api": "image_editing.yml", "local": "image_editing_local.yml"}


class Runner:
    """The served pipeline with admission, the seeded cache, coalescing and progress around each run."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        """
        Serve `pipeline`, which must be warmed up.

        :param pipeline: A pipeline whose generator is named `text_to_image` (and whose output is `images`).
        :param settings: The serving settings: concurrency, queue, cache budget, Redis.
        """
        self.pipeline = pipeline
        self.generator: TextToImageBase = pipeline.get_component(COMPONENT)
        concurrency = settings.max_concurrency if self.generator.concurrent_batches else 1  # one device, one at once
        self.gate = AdmissionGate(concurrency, settings.max_queue)
        self.cache: ByteBudgetLRU[ImageContent] = ByteBudgetLRU(settings.cache_bytes)
        self.coalescer: Coalescer[ImageContent] = Coalescer()
        self.shared = _shared_cache(pipeline, self.generator, settings) if settings.cache_bytes else None
        self.served = frozenset(self.generator.served_models())
        self.admitted_phase = "sent" if self.generator.upstream_urls() else "generating"

    def validate(self, n: int = 1, **params: Any) -> None:
        """Raise `InvalidRequestError` for what `generate` would refuse; nothing is generated."""
        self.generator.validate_request(n, **params)

    def served_models(self) -> list[str]:
        """The model ids a request may ask for: the allow-list when there is one, else the default model."""
        return self.generator.served_models()

    async def generate(self, n: int = 1, **params: Any) -> list[ImageContent]:
        """
        The images for the generator's run inputs (`prompt`, ..., `n`; `None` means the pipeline's default).

        :raises InvalidRequestError: A parameter is out of range; nothing was run.
        :raises ServerBusyError: The queue is full.
        :raises ImageGenerationError: Generation failed; subclasses say how.
        """
        pinned = params.get("seed") is not None
        requests = self.generator.requests(n, **params)
        if not self.generator.concurrent_batches or len(requests) == 1:
            return [await self._image(request, pinned) for request in requests]
        tasks = [asyncio.ensure_future(self._image(request, pinned)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # after a failure (or cancellation), nobody waits for the others
                task.cancel()

    async def _image(self, request: GenerationRequest, pinned: bool) -> ImageContent:
        """One image: from the cache when its seed was pinned and it was made before, else made (once at a time)."""
        if not pinned:
            return await self._make(request, None)
        key = (CACHE_SCOPE.get(), *request.cache_key())
        cached = self.cache.get(key)
        progress.report({"phase": "cache", "hit": cached is not None, "bytes": self.cache.size_bytes})
        if cached is None and self.shared is not None and (cached := await self.shared.get(key)) is not None:
            self.cache.put(key, cached, len(cached.base64_image))
        if cached is not None:
            return replace(cached, meta={**cached.meta, "cached": True})  # only such an answer may be a 304
        return await self.coalescer.run(key, lambda: self._make(request, key))

    async def admitted(
        self, work: Callable[[progress.ProgressCallback], Awaitable[list[ImageContent]]]
    ) -> list[ImageContent]:
        """
        Run `work` (given the progress callback to pass the generator) through the admission gate.

        :raises ServerBusyError: The queue is full.
        """
        queued = time.monotonic()
        received = queued
        admitted = False

        def report(event: dict[str, Any]) -> None:
            nonlocal received
            if event["phase"] == "received":
                received = time.monotonic()
            progress.report(event)

        progress.report({"phase": "queued"})
        try:
            async with self.gate.slot_async():
                admitted = True
                progress.report({"phase": self.admitted_phase, "waited": time.monotonic() - queued})
                images = await work(report)
        finally:
            progress.report({"phase": "released", "admitted": admitted})
        for image in images:
            meta = image.meta
            model = meta["model"] if meta["model"] in self.served else "other"
            progress.report(
                {"phase": "finished", "model": model, "width": meta["width"], "height": meta["height"],
                 "format": meta["format"], "seconds": time.monotonic() - received}
            )  # fmt: skip
        return images

    async def _make(self, request: GenerationRequest, key: tuple | None) -> ImageContent:
        """Run the pipeline for one image through the admission gate; keep it when `key` is set."""
        [image] = await self.admitted(lambda report: self._run(request, report))
        if key is not None:
            self.cache.put(key, image, len(image.base64_image))  # a zero budget stores nothing
            progress.report({"phase": "cache", "bytes": self.cache.size_bytes})
            if self.shared is not None:
                await self.shared.put(key, image)
        return image

    async def _run(self, request: GenerationRequest, report: progress.ProgressCallback) -> list[ImageContent]:
        # What equals the generator's default is left out (Haystack deep-copies each input several times per run);
        # the seed is always given, since the generator would pick its own.
        defaults = vars(self.generator.defaults)
        inputs = {name: value for name, value in vars(request).items() if name == "seed" or value != defaults[name]}
        if previews := progress.previews_wanted():
            inputs["previews"] = previews
        return await run_pipeline(self.pipeline, COMPONENT, inputs, report)


async def run_pipeline(
    pipeline: Pipeline, component: str, inputs: dict[str, Any], report: progress.ProgressCallback
) -> list[ImageContent]:
    """Run `component`'s pipeline on `inputs`, telling its marker an edit's source image."""
    # Haystack deep-copies every input several times per run: the defaults (`None`) are left out, not copied.
    given = {name: value for name, value in inputs.items() if value is not None}
    data = {component: {**given, "progress_callback": report}}
    if component == EDIT_COMPONENT and MARKER in pipeline.graph.nodes:
        data[MARKER] = {"source": inputs["image"]}
    result = await pipeline.run_async(data)
    [images] = [outputs["images"] for outputs in result.values() if "images" in outputs]
    return images


async def edit_images(runner: Runner, pipeline: Pipeline, **params: Any) -> list[ImageContent]:
    """Run the editing `pipeline` on its component's inputs (`image`, `mask`, `prompt`, ...), admitted by `runner`."""
    if previews := progress.previews_wanted():
        params = {**params, "previews": previews}
    return await runner.admitted(lambda report: run_pipeline(pipeline, EDIT_COMPONENT, params, report))


def load_pipeline(folder: Path, settings: Settings, files: dict[str, str] = PIPELINE_FILES) -> Pipeline:
    """
    The backend's pipeline from `folder`, with the settings that change a component applied to its init parameters.

    Only our `components` may be deserialized. Not warmed up. Haystack's copy of each run's inputs is made to skip the
    values a deep copy returns as they are (`private_haystack`).
    """
    allow_deserialization_module("components")
    skip_copying_immutable_values()
    data = yaml.safe_load((folder / files[settings.backend]).read_text())
    return Pipeline.from_dict(apply_settings(data, settings))


def apply_settings(data: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The serialized pipeline `data` with `component_overrides` applied in place (only parameters its YAML has)."""
    for name, overrides in component_overrides(settings).items():
        spec = data["components"].get(name)
        if spec is None:
            continue
        init = spec.setdefault("init_parameters", {})
        parameters = dict(overrides)
        local_model = parameters.pop("local_model", None)
        if local_model is not None and spec["type"].startswith(LOCAL_GENERATORS):
            parameters["model"] = local_model
        init.update({key: value for key, value in parameters.items() if key in init or name == MARKER})
    return data


def component_overrides(settings: Settings) -> dict[str, dict[str, Any]]:
    """
    The init parameters that settings set, by component name: what the operator set wins over the YAML.

    The generator and the editor (`text_to_image`, `image_to_image`, either backend) get the generator settings the
    operator set (only those: the rest is the YAML's); `load_pipeline` applies to each component only the parameters
    its YAML has (the local backend has no `endpoint_url`, the API backend's `model` is a Hub id, not `local_model`).
    """
    marker: dict[str, Any] = {"embed_parameters": settings.embed_parameters}
    if settings.c2pa_cert is not None and settings.c2pa_key is not None:
        marker |= {"c2pa_cert": str(settings.c2pa_cert), "c2pa_key": str(settings.c2pa_key)}
        marker["c2pa_tsa_url"] = settings.c2pa_tsa_url
    generator = generator_overrides(settings)
    return {MARKER: marker, COMPONENT: generator, EDIT_COMPONENT: generator}


# Settings field -> the generators' init parameter it sets (when the operator set it).
GENERATOR_SETTINGS = {
    "endpoint": "endpoint_url",
    "models": "allowed_models",
    "timeout": "timeout",
    "max_image_bytes": "max_image_bytes",
    "router_url": "router_url",
    "max_inflight_bytes": "max_inflight_bytes",
    "result_url_allow": "result_url_allow",
}
LOCAL_GENERATORS = "components.diffusers_"  # `local_model` is their `model` (the API components' is a Hub id)


def generator_overrides(settings: Settings) -> dict[str, Any]:
    """The generators' init parameters that the operator's settings set, YAML-shaped (lists, strings)."""
    chosen = settings.model_fields_set
    overrides: dict[str, Any] = {
        parameter: getattr(settings, name) for name, parameter in GENERATOR_SETTINGS.items() if name in chosen
    }
    if overrides.get("allowed_models") is not None:
        overrides["allowed_models"] = list(overrides["allowed_models"])
    if "result_url_allow" in overrides:
        overrides["result_url_allow"] = [str(network) for network in overrides["result_url_allow"]]
    if "local_model" in chosen and settings.local_model is not None:
        overrides["local_model"] = settings.local_model  # the local generators' `model` (see `load_pipeline`)
    return overrides


_runner: Runner | None = None
_runner_lock = threading.Lock()


def served_runner(settings: Settings, folder: Path | None = None) -> Runner:
    """
    The runner of this process, made on first use from the pipeline files in `folder`, warmed up.

    `folder` defaults to the native wrapper's folder in Hayhooks' pipelines directory (`HAYHOOKS_PIPELINES_DIR`).
    The server's log is set up first. Settings errors and model loading fail here, at startup, not on a request.
    """
    global _runner  # noqa: PLW0603 - one runner per process, shared by the wrappers Hayhooks deploys
    with _runner_lock:
        if _runner is None:
            configure_server_log()  # before the components log anything (a model loading)
            folder = folder or Path(hayhooks_settings.pipelines_dir) / PIPELINE_NAME
            pipeline = load_pipeline(folder, settings)
            pipeline.warm_up()
            _runner = Runner(pipeline, settings)
        return _runner


def app_runner(app: FastAPI) -> Runner:
    """The runner of the deployed image wrapper; `PipelineNotServedError` when none is deployed."""
    runner = getattr(app.state.pipeline_registry.get(PIPELINE_NAME), "runner", None)
    if not isinstance(runner, Runner):
        raise PipelineNotServedError(f"no pipeline named {PIPELINE_NAME} is deployed")
    return runner


def served_pipeline(app: FastAPI, name: str = PIPELINE_NAME) -> Pipeline:
    """The pipeline of the deployed wrapper `name`; `PipelineNotServedError` when none is deployed."""
    pipeline = getattr(app.state.pipeline_registry.get(name), "pipeline", None)
    if not isinstance(pipeline, Pipeline):
        raise PipelineNotServedError(f"no pipeline named {name} is deployed")
    return pipeline


async def generate(app: FastAPI, **params: Any) -> list[ImageContent]:
    """Run the served image pipeline: `params` are the generator's run inputs (`prompt`, ..., `n`)."""
    return await app_runner(app).generate(**params)


Generate = Callable[..., Awaitable[list[ImageContent]]]


async def generate_watched(
    app: FastAPI, phases: frozenset[str], previews: int = 0, run: Generate | None = None, **params: Any
) -> AsyncIterator[dict[str, Any] | list[ImageContent]]:
    """
    Run a served image pipeline, yielding its progress events of `phases`, then its images.

    `run` is `generate` (the default) or `edit`, with `params` as its inputs. Events come as they happen (see
    `image_generation_server.progress`; `previews` asks the backend for that many `preview` events per image). A
    failure is raised where the images would come. Closing the iterator early cancels the generation (a local one
    stops at its next step). The events are bounded by the generation: its steps and previews.
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
    return await edit_images(app_runner(app), served_pipeline(app, EDIT_PIPELINE_NAME), **params)


def image_size(pipeline: Pipeline, width: int | None, height: int | None) -> tuple[int, int]:
    """The size a request's images get: its own width and height, else the pipeline's defaults."""
    defaults = pipeline.get_component(COMPONENT).defaults
    return width or defaults.width, height or defaults.height


async def edit_size(pipeline: Pipeline, **params: Any) -> tuple[int, int]:
    """
    The size an edit's images get: its width and height, else its image's own (as the editor resolves it).

    :raises InvalidRequestError: What the editor would refuse (a parameter, an upload); nothing was run.
    """
    [first, *_] = await asyncio.to_thread(pipeline.get_component(EDIT_COMPONENT).requests, **params)
    return first.width, first.height


def served_models(app: FastAPI) -> list[str]:
    """The model ids a request may ask for: the allow-list when there is one, else the default model."""
    return app_runner(app).served_models()


def _shared_cache(pipeline: Pipeline, generator: TextToImageBase, settings: Settings) -> SharedResultCache | None:
    """
    The Redis level of the cache: `cache_redis_url`, else the jobs' Redis when Hayhooks' durable store is Redis.

    One namespace per pipeline and backend, so that replicas serving different ones never share images.
    """
    url = settings.cache_redis_url
    if url is None and hayhooks_settings.durable_mode and hayhooks_settings.durable_store == "redis":
        url = hayhooks_settings.durable_redis_url
    if not url:
        return None
    served = {"backend": generator.backend_meta(), "pipeline": pipeline.to_dict()}
    namespace = hashlib.sha256(json.dumps(served, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return SharedResultCache(url, namespace)
