"""
Jobs: Hayhooks' durable execution of the image pipeline (`POST /{name}/run-durable`, then `executions/{id}`).

A job takes the body of `/run` plus `n`, is queued in Hayhooks' execution store (in memory, or Redis shared by
replicas), reports its progress (phases, and every denoising step of a local model) live on the SSE stream and durably
at checkpoints, stops at its next step when cancelled, and puts its images in the image store: its result is their
URLs, never their bytes. The pipeline wrapper mixes `Jobs` (or `OwnedJobs`, when API keys are on) into its class when
Hayhooks runs in durable mode, and only then: a durable wrapper cannot be loaded by a live server.
"""

import asyncio
import contextlib
import math
import multiprocessing
import time
from typing import Any, ClassVar

import pybase64
from fastapi import FastAPI, HTTPException, Request, Response
from hayhooks import log
from hayhooks.durable import DurableContext, DurableExecutionCancelledError
from hayhooks.settings import settings as hayhooks_settings
from haystack import Pipeline
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware

from components import errors
from components.request import Batch, BatchParameters, EditParameters, PartialImages
from image_generation_server import answers, progress
from image_generation_server.generation import COMPONENT, EDIT_COMPONENT, Runner, edit_images
from image_generation_server.image_store import ImageStore
from image_generation_server.job_shares import JOB_DURATIONS, JobShares
from image_generation_server.private_hayhooks import default_hayhooks_settings, set_hayhooks_settings
from image_generation_server.private_starlette import append_inner_middleware
from image_generation_server.responses import classify
from image_generation_server.result_cache import CACHE_SCOPE
from image_generation_server.settings import Settings, current_settings, env_name
from image_generation_server.uploads import image_argument

# Jobs queued under one revision wait for a replica of the same revision: change it only when old jobs can't run.
REVISION = "1"
OWNER_PREFIX = "key-"
DEFAULT_MAX_PENDING_JOBS = 100
CANCEL_POLL_SECONDS = 0.5  # how often a job checks for a cancel while no step reports (an upstream call, a queue)
STORE_RETRY_AFTER_SECONDS = 5  # what a client is told to wait while the job store (Redis) is away
CHECKPOINT_INTERVAL_SECONDS = 0.5  # step progress is committed at most this often (and at the last step)
# The progress events a job shows (image_generation_server/progress.py has more, for the metrics), and their fields.
JOB_EVENTS = {
    "queued": (), "sent": (), "generating": (), "step": ("step", "steps"), "received": (),
    "stored": ("image", "images"),
    "preview": ("index", "previews", "step", "steps", "image", "mime_type", "width", "height"),
}  # fmt: skip
# Events that go to the stream only: a preview's image is for watching live, not for the job's durable record.
STREAM_ONLY = frozenset({"preview"})


class CheckedAtSubmission(BaseModel):
    """A job body that the component validates at submission (422), so that a job never fails on its input."""

    check: ClassVar[Any] = None  # the component's own validation, bound when the wrapper is set up

    def pipeline_inputs(self) -> dict[str, Any]:
        """The component's run inputs."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _within_limits(self) -> "CheckedAtSubmission":
        """Refuse at submission what the route refuses."""
        check = type(self).check
        if check is not None:
            try:
                check(**self.pipeline_inputs())
            except errors.InvalidRequestError as e:
                raise ValueError(str(e)) from None
        return self


class Previewed(BaseModel):
    """A job body's ask for previews on its stream (not a pipeline input)."""

    partial_images: PartialImages = Field(
        0,
        description="Previews per image on the stream, 0 (default) to 3: `preview` chunks with a small image of the "
        "generation in progress, from the local backend (the Hugging Face API backend sends none).",
    )


class JobRequest(CheckedAtSubmission, Previewed, BatchParameters):
    """The body of `POST /{name}/run-durable`: the parameters of `/run`, with the same limits, plus `n`."""

    def pipeline_inputs(self) -> dict[str, Any]:
        """The component's run inputs: every field but the stream's `partial_images`."""
        return self.model_dump(exclude={"partial_images"})


class EditJobRequest(CheckedAtSubmission, Previewed, Batch, EditParameters):
    """
    The body of `POST /image_editing/run-durable`: an edit's parameters plus `n`, and the image and mask.

    The image and mask are base64, or the path of an image of this server's store (`/images/...`, what a finished
    job's result lists). Checked at submission (422), the uploads included, like `/image_editing/run`.
    """

    store: ClassVar[ImageStore | None] = None  # where `/images/...` paths are read from

    image: str = Field(description="The image: base64 (PNG, JPEG or WebP), or the path of an image of this server.")
    mask: str | None = Field(
        None, description="Optional: base64 or an image path of this server, the image's size, clear where to edit."
    )

    def pipeline_inputs(self) -> dict[str, Any]:
        """The editing component's run inputs: the images read from base64 or the store."""
        inputs = self.model_dump(exclude={"image", "mask", "partial_images"})
        inputs["image"] = image_argument(EditJobRequest.store, self.image, "image")
        inputs["mask"] = image_argument(EditJobRequest.store, self.mask, "mask") if self.mask is not None else None
        return inputs


class JobImage(BaseModel):
    """One image of a finished job: where to download it (no API key needed), and what it is."""

    url: str
    seed: int
    width: int
    height: int
    format: str
    etag: str


class JobResult(BaseModel):
    """The result of a finished job."""

    images: list[JobImage]


class Jobs:
    """Mixed into the pipeline wrapper in durable mode: the durable run of the same pipeline as `/run`."""

    durable_revision = REVISION
    pipeline: Pipeline
    runner: Runner
    component: ClassVar[str] = COMPONENT
    request_model: ClassVar[Any] = JobRequest

    def setup(self) -> None:
        """Set up the wrapper, bind the component's validation and the pixel cap to job requests, open the store."""
        super().setup()  # type: ignore[misc]
        settings, pipeline = current_settings(), self.pipeline
        self.image_store = ImageStore.from_settings(settings)
        requests = pipeline.get_component(self.component).requests

        def check(**inputs: Any) -> None:
            """What the component refuses, then the pixel cap on the size it resolves (an edit's: its image's own)."""
            [first, *others] = requests(**inputs)
            answers.check_pixels(1 + len(others), first.width, first.height, settings.max_request_pixels)

        self.request_model.check = check
        self.request_model.store = self.image_store

    async def run_durable_async(self, context: DurableContext, request: JobRequest) -> JobResult:
        """
        Generate `n` images with live progress, store them, and return their URLs.

        Cancelling the job stops a local generation at its next step and drops an upstream call.
        """
        return await run_job(self.runner, self.pipeline, self.image_store, context, request, self.component)


class EditJobs(Jobs):
    """Jobs of the editing pipeline (`pipelines/image_editing/`): the same routes under `/image_editing/`."""

    component = EDIT_COMPONENT
    request_model = EditJobRequest

    async def run_durable_async(  # type: ignore[override]
        self, context: DurableContext, request: EditJobRequest
    ) -> JobResult:
        """
        Edit the image `n` times with live progress, store the edits, and return their URLs.

        Cancelling the job stops a local edit at its next step and drops an upstream call.
        """
        return await run_job(self.runner, self.pipeline, self.image_store, context, request, self.component)


class OwnedJobs:
    """Mixed before `Jobs`: executions belong to the API key that submitted them (other keys get 404)."""

    def durable_owner_id(self, request: Request) -> str:
        """The id of the caller's API key (a hash, never the key) that `HTTPGuard` found; 401 without one."""
        owner = getattr(request.state, "key_id", None)
        if owner is None:  # the guard refuses such a request first; this holds without it too
            raise HTTPException(401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"})
        return OWNER_PREFIX + owner


def install(app: FastAPI, settings: Settings) -> None:
    """
    Give every 503 a `Retry-After`, and in durable mode each client its share of jobs and streams.

    Hayhooks' job routes answer a 503 without `Retry-After` while the job store is away. The shares are
    `image_generation_server.job_shares`.
    """
    if app.state.durable_mode:
        limits = {
            env_name("max_jobs_per_client"): (
                settings.max_jobs_per_client, "HAYHOOKS_DURABLE_MAX_NONTERMINAL_EXECUTIONS",
                hayhooks_settings.durable_max_nonterminal_executions,
            ),
            env_name("max_streams_per_client"): (
                settings.max_streams_per_client, "HAYHOOKS_DURABLE_REDIS_MAX_VIEWERS",
                hayhooks_settings.durable_redis_max_viewers if hayhooks_settings.durable_store == "redis" else 0,
            ),
        }  # fmt: skip
        for name, (share, shared_name, shared) in limits.items():
            if shared and share >= shared:
                raise ValueError(f"{name}={share} must be below {shared_name}={shared}, the limit of all clients")
        # After HTTPGuard (appended before the doors are installed), which names the client.
        append_inner_middleware(
            app,
            Middleware(
                JobShares,
                api=app,
                max_jobs=settings.max_jobs_per_client,
                max_streams=settings.max_streams_per_client,
                max_finished=settings.max_finished_jobs_per_client,
            ),
        )
    native = app.exception_handlers[StarletteHTTPException]

    async def with_retry_after(request: Request, error: Exception) -> Response:
        if isinstance(error, StarletteHTTPException) and error.status_code == 503:
            error.headers = {"Retry-After": str(STORE_RETRY_AFTER_SECONDS), **(error.headers or {})}
        return await native(request, error)

    app.add_exception_handler(StarletteHTTPException, with_retry_after)


def jobs_mixin(jobs: type[Jobs] = Jobs) -> type[Jobs]:
    """`jobs` (`Jobs`, or `EditJobs`), owned by API keys when they are configured (else job ids are the capability)."""
    return type(f"Owned{jobs.__name__}", (OwnedJobs, jobs), {}) if current_settings().api_keys else jobs


def configure_durable_mode(settings: Settings) -> None:
    """
    Our defaults for Hayhooks' durable mode, applied before the app is built.

    The execution store is Hayhooks' in-memory store unless Redis is configured (`HAYHOOKS_DURABLE_STORE=redis` or
    `HAYHOOKS_DURABLE_REDIS_URL`); with Redis, the seeded-result cache is shared through it too. A process with the
    memory store refuses to be one of several workers: each would hold its own jobs. At most
    `DEFAULT_MAX_PENDING_JOBS` jobs wait or run unless configured otherwise, and a finished job is kept for as long
    as its images at most (`IMAGE_GENERATION_IMAGE_MAX_AGE`, below Hayhooks' 7 days).
    """
    if not hayhooks_settings.durable_mode:
        return
    if "durable_redis_url" not in hayhooks_settings.model_fields_set:  # what the `HAYHOOKS_*` environment set
        default_hayhooks_settings(durable_store="memory")
    default_hayhooks_settings(durable_max_nonterminal_executions=DEFAULT_MAX_PENDING_JOBS)
    # A finished job is kept no longer than its images: past that its result would list URLs that answer 404.
    image_lifetime = math.ceil(settings.image_max_age)
    set_hayhooks_settings(
        durable_terminal_ttl_seconds=min(hayhooks_settings.durable_terminal_ttl_seconds, image_lifetime)
    )
    if hayhooks_settings.durable_store == "memory" and multiprocessing.parent_process() is not None:
        raise RuntimeError(
            "the in-memory job store serves one process: run one worker, or set HAYHOOKS_DURABLE_STORE=redis and "
            "HAYHOOKS_DURABLE_REDIS_URL to share jobs between processes"
        )


async def run_job(  # noqa: PLR0913
    runner: Runner,
    pipeline: Pipeline,
    store: ImageStore,
    context: DurableContext,
    request: JobRequest | EditJobRequest,
    component: str = COMPONENT,
) -> JobResult:
    """Run the job's generations, cancelled when the job is; progress goes to the job as it happens."""
    publisher = _ProgressPublisher(context)
    # The job runs in Hayhooks' durable worker, outside the request: scope the seeded cache to its owner's key here,
    # as the guard does for requests, so that one key's jobs are never answered from another key's images.
    CACHE_SCOPE.set((context.owner_id or "").removeprefix(OWNER_PREFIX))
    with progress.reporting_to(publisher.report, previews=request.partial_images):  # the tasks below inherit it
        work = asyncio.ensure_future(_generate(runner, pipeline, store, request, component))
    watch = asyncio.ensure_future(_wait_for_cancel(context))
    started = time.monotonic()
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            watch.result()  # raises the cancellation
        result = await _unwrapped(work, publisher)
        JOB_DURATIONS.record(time.monotonic() - started)  # what a queued job's estimated start is made of
        return result
    finally:
        work.cancel()
        watch.cancel()
        await publisher.flush()


async def _generate(
    runner: Runner, pipeline: Pipeline, store: ImageStore, request: JobRequest | EditJobRequest, component: str
) -> JobResult:
    images = []
    inputs = request.pipeline_inputs()
    made = await (runner.generate(**inputs) if component == COMPONENT else edit_images(runner, pipeline, **inputs))
    for index, image in enumerate(made):
        data = pybase64.b64decode(image.base64_image, validate=True)
        stored = await asyncio.to_thread(store.put, data, image.meta["format"])
        meta = image.meta
        images.append(
            JobImage(url=stored.url, seed=meta["seed"], width=meta["width"], height=meta["height"],
                     format=meta["format"], etag=stored.etag)
        )  # fmt: skip
        progress.report({"phase": "stored", "image": index + 1, "images": len(made)})
    return JobResult(images=images)


async def _unwrapped(work: "asyncio.Future[JobResult]", publisher: "_ProgressPublisher") -> JobResult:
    """
    The job's result; a failure is re-raised as our own error (its class names the failure in the job's error).

    Hayhooks records a failed job's error as its class name and "Durable execution failed", so the sentence a person
    can act on (what every other door answers, with its status and Retry-After) goes first into the job's progress
    and its stream, as a `failed` event.
    """
    try:
        return await work
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(
            cause, (errors.ImageGenerationError, DurableExecutionCancelledError)
        ):
            cause = cause.__cause__
        if cause is None:
            raise
        log.warning("Job failed: {}", type(cause).__name__)
        if isinstance(cause, errors.ImageGenerationError):
            failure = classify(cause)
            event = {"phase": "failed", "error": type(cause).__name__, "status": failure.status}
            await publisher.publish({**event, "message": failure.message, "retry_after": failure.retry_after})
        raise cause from None


async def _wait_for_cancel(context: DurableContext) -> None:
    """Return by raising `DurableExecutionCancelledError` once the job is cancelled; store hiccups are ignored."""
    while True:
        await asyncio.sleep(CANCEL_POLL_SECONDS)
        try:
            await context.check_cancelled()
        except DurableExecutionCancelledError:
            raise
        except Exception as e:  # the store is down: the runtime's lease handling decides what happens to the job
            log.debug("Job cancel check failed: {}", type(e).__name__)


class _ProgressPublisher:
    """
    The progress callback of one job: each event goes live to the SSE stream and into the job's progress.

    Previews go to the stream only. Progress is committed at checkpoints: every phase, and steps at most every
    `CHECKPOINT_INTERVAL_SECONDS` (and the last one). A step reported from the generating thread also checks for a
    cancel, which stops the generation there.
    """

    def __init__(self, context: DurableContext) -> None:
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.last_checkpoint = 0.0
        self.pending: set[asyncio.Task] = set()

    def report(self, event: dict[str, Any]) -> None:
        """Publish a job event: from a worker thread, wait for it (raising a cancellation); on the loop, schedule it."""
        fields = JOB_EVENTS.get(event["phase"])
        if fields is None:
            return
        event = {"phase": event["phase"], **{name: event[name] for name in fields}}
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            task = self.loop.create_task(self.publish(event))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        else:
            asyncio.run_coroutine_threadsafe(self.publish(event), self.loop).result()

    async def publish(self, event: dict[str, Any]) -> None:
        """Stream, record and (when due) checkpoint `event`; for a step, raise if the job was cancelled."""
        try:
            self.context.stream_chunk_sync(event)  # a chunk over Hayhooks' cap (64 KB) is dropped, not an error
            if event["phase"] in STREAM_ONLY:
                return
            await self.context.report_progress(_message(event), kind=event["phase"], metadata=event)
            now = time.monotonic()
            last_step = event["phase"] == "step" and event["step"] == event["steps"]
            if event["phase"] != "step" or last_step or now - self.last_checkpoint >= CHECKPOINT_INTERVAL_SECONDS:
                self.last_checkpoint = now
                await self.context.checkpoint()
            if event["phase"] == "step":
                await self.context.check_cancelled()
        except DurableExecutionCancelledError:
            raise
        except Exception as e:  # progress is best effort: a store hiccup must not fail the generation
            log.debug("Job progress not recorded: {}", type(e).__name__)

    async def flush(self) -> None:
        """Wait for the progress still being published from the event loop."""
        if self.pending:
            await asyncio.wait(tuple(self.pending))


def _message(event: dict[str, Any]) -> str:
    phase = event["phase"]
    if phase == "step":
        return f"step {event['step']} of {event['steps']}"
    if phase == "stored":
        return f"stored image {event['image']} of {event['images']}"
    if phase == "failed":
        return event["message"]
    return {"sent": "sent upstream"}.get(phase, phase)
