"""
`TextToImageBase`: the inputs, defaults, validation and output that every text-to-image backend shares.

A backend subclasses it (and is decorated with `@component`), sets `defaults` in `__init__`, resolves `settings` and
prepares itself in `warm_up()`, and supplies `_produce` / `_produce_async`, which turn a validated request into
encoded image bytes. A run for `n` images makes `n` single-image requests with seeds `seed, seed+1, ...`, so image
*i* of a batch is the image that seed `seed+i` gives alone, byte for byte.

The output is the image as made: its format converted when the caller asked for another, nothing else changed.
Queueing, caching and marking the image belong to whoever serves it (the pipeline's next component, the server).
"""

import asyncio
import time
from dataclasses import replace
from typing import Any

import pybase64
from haystack import component, logging
from haystack.dataclasses import ImageContent

from components.errors import InvalidImageError, InvalidRequestError
from components.image_codec import convert, sniff
from components.progress import ProgressCallback, ignore
from components.request import MAX_IMAGES, MAX_SEED, GenerationRequest, OutputFormat, random_seed
from components.settings import GeneratorSettings

logger = logging.getLogger(__name__)


class TextToImageBase:
    """Same run signature, same JSON-safe `ImageContent` output and same meta, whatever makes the pixels."""

    defaults: GenerationRequest
    request_type: type[GenerationRequest] = GenerationRequest
    settings: GeneratorSettings | None = None  # resolved in `warm_up()`
    # Whether the backend makes several images at once (an API), or one at a time (one device).
    concurrent_batches: bool = True

    def warm_up(self) -> None:
        """Prepare the backend for `run`. Idempotent."""
        raise NotImplementedError

    async def warm_up_async(self) -> None:
        """Prepare the backend for `run_async`. Idempotent."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the backend can serve (after `warm_up`), as far as can be told without spending anything."""
        return self.settings is not None

    def upstream_urls(self) -> tuple[str, ...]:
        """The URLs its requests go to, for a readiness probe to reach (none for a local backend)."""
        return ()

    def served_models(self) -> list[str]:
        """The model ids a run may ask for (after `warm_up`): the allow-list when one is set, else the default."""
        assert self.settings is not None
        allowed = self.settings.allowed_models
        return sorted(allowed) if allowed else [self.defaults.model]

    def backend_meta(self) -> dict[str, Any]:
        """What every image's meta says about the backend (`backend`, `provider`, ...), after `warm_up`."""
        raise NotImplementedError

    def _produce(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        """The image's bytes; `previews` in progress go to `report` when the backend can make them."""
        raise NotImplementedError

    async def _produce_async(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        raise NotImplementedError

    def _check(self, request: GenerationRequest) -> None:
        """Backend-specific limits, checked after the common ones; raise `InvalidRequestError`."""

    def requests(self, n: int = 1, **params: Any) -> list[GenerationRequest]:
        """
        The validated request of each image a run with these parameters makes: defaults applied, seeds chosen.

        `None` means the default; without a seed, a random one is chosen for the first image.

        :raises InvalidRequestError: A parameter is out of range; nothing was sent or computed.
        """
        assert self.settings is not None, "warm_up() first"
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_IMAGES):
            raise InvalidRequestError(f"n={n!r} must be in 1..{MAX_IMAGES}")
        values = {name: value for name, value in params.items() if value is not None}
        values.setdefault("seed", random_seed(MAX_SEED - n + 1))
        request = self.request_type(**{**self.defaults.__dict__, **values})
        request.validate(self.settings.allowed_models)
        if request.seed + n - 1 > MAX_SEED:
            raise InvalidRequestError(f"seed={request.seed} must be at most {MAX_SEED - n + 1} for n={n}")
        self._check(request)
        return [replace(request, seed=request.seed + i) for i in range(n)]

    def validate_request(self, n: int = 1, **params: Any) -> None:
        """Raise `InvalidRequestError` for the `run` parameters that `run` would refuse; nothing is generated."""
        self.requests(n, **params)

    @component.output_types(images=list[ImageContent])
    def run(  # noqa: PLR0913
        self,
        prompt: str,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        n: int = 1,
        progress_callback: ProgressCallback | None = None,
        previews: int = 0,
    ) -> dict[str, list[ImageContent]]:
        """
        Generate `n` images, with seeds `seed`, `seed+1`, ...

        :param prompt: What to draw.
        :param negative_prompt: What to keep out of the image.
        :param width: Width in pixels, a multiple of 8 in 64..2048; overrides the default.
        :param height: Height in pixels, a multiple of 8 in 64..2048; overrides the default.
        :param num_inference_steps: Denoising steps; overrides the default.
        :param guidance_scale: Guidance scale; overrides the default.
        :param seed: Seed in 0..2^32-1; a random one is chosen (and returned in the meta) when omitted.
        :param model: Hub model id; overrides the default.
        :param output_format: `png`, `jpeg` or `webp`; overrides the default.
        :param n: How many images, 1..10; image *i* is the image that seed `seed+i` gives alone.
        :param progress_callback: Called with each progress event (`components.progress`); an exception it raises
            stops the generation.
        :param previews: How many `preview` events per image to send to `progress_callback`, at evenly spaced steps;
            a backend that cannot show a generation in progress (an API) sends none.
        :returns: `images`: `n` `ImageContent`s (base64 data, MIME type, and meta with backend, model, provider,
            prompts, size, seed and upstream format), in seed order.
        :raises InvalidRequestError: A parameter is out of range; nothing was sent or computed.
        :raises ImageGenerationError: Generation failed; subclasses say how.
        """
        self.warm_up()
        requests = self.requests(
            n, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": self._images(requests, progress_callback or ignore, previews)}

    @component.output_types(images=list[ImageContent])
    async def run_async(  # noqa: PLR0913
        self,
        prompt: str,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        model: str | None = None,
        output_format: OutputFormat | None = None,
        n: int = 1,
        progress_callback: ProgressCallback | None = None,
        previews: int = 0,
    ) -> dict[str, list[ImageContent]]:
        """
        Generate `n` images without blocking the event loop.

        With `concurrent_batches`, a batch's images are made at once; when one fails, the others are cancelled.
        Parameters, returns and errors are those of `run`.
        """
        await self.warm_up_async()
        requests = self.requests(
            n, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": await self._images_async(requests, progress_callback or ignore, previews)}

    def _images(self, requests: list[GenerationRequest], report: ProgressCallback, previews: int) -> list[ImageContent]:
        """One image per request, one after another."""
        images = []
        for request in requests:
            started = time.monotonic()
            raw = self._produce(request, report, previews)
            report({"phase": "received", "seconds": time.monotonic() - started})
            images.append(self._image(request, raw, sniff(raw)))
        return images

    async def _images_async(
        self, requests: list[GenerationRequest], report: ProgressCallback, previews: int
    ) -> list[ImageContent]:
        """One image per request: at once with `concurrent_batches` (one failing cancels the others), else in turn."""
        if not self.concurrent_batches or len(requests) == 1:
            return [await self._image_async(request, report, previews) for request in requests]
        tasks = [asyncio.ensure_future(self._image_async(request, report, previews)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # after a failure (or cancellation), nobody waits for the others
                task.cancel()

    async def _image_async(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> ImageContent:
        started = time.monotonic()
        raw = await self._produce_async(request, report, previews)
        report({"phase": "received", "seconds": time.monotonic() - started})
        sniffed = sniff(raw)
        if sniffed[0] == request.output_format:
            return self._image(request, raw, sniffed)  # nothing to decode: cheaper than a hand-off to a thread
        return await asyncio.to_thread(self._image, request, raw, sniffed)

    def _image(self, request: GenerationRequest, raw: bytes, sniffed: tuple[str, int, int]) -> ImageContent:
        """Check the image (`sniffed` by `sniff`), convert it only if its format differs, and wrap it with its meta."""
        upstream_format, width, height = sniffed
        if (width, height) != (request.width, request.height):
            raise InvalidImageError(f"the upstream image is {width}x{height}, not {request.width}x{request.height}")
        data = raw if upstream_format == request.output_format else convert(raw, request.output_format)
        meta = {
            **self.backend_meta(),
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": request.model,
            "width": width,
            "height": height,
            "seed": request.seed,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "upstream_format": upstream_format,
            "format": request.output_format,
        }
        logger.debug(
            "Generated {width}x{height} {format} with {model} (seed {seed})",
            width=width,
            height=height,
            format=request.output_format,
            model=request.model,
            seed=request.seed,
        )
        return ImageContent(
            base64_image=pybase64.b64encode_as_string(data),  # SIMD: ~25x the stdlib base64 speed
            mime_type=f"image/{request.output_format}",
            meta=meta,
            validation=False,
        )
