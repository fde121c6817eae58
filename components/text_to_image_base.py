"""
`TextToImageBase`: the inputs, defaults, validation and output that every text-to-image backend shares.

A backend subclasses it (and is decorated with `@component`), sets `defaults` in `__init__`, creates `_results` in
`warm_up()`, and supplies `_produce` / `_produce_async`, which turn a validated request into encoded image bytes.
A run for `n` images makes `n` single-image requests with seeds `seed, seed+1, ...`, so image *i* of a batch is the
image that seed `seed+i` gives alone, byte for byte (and shares its cache entry).
"""

import asyncio
from dataclasses import replace
from typing import Any

from haystack import component
from haystack.dataclasses import ImageContent

from components.errors import InvalidRequestError
from components.image_results import ImageResults
from components.request import MAX_IMAGES, MAX_SEED, GenerationRequest, OutputFormat, random_seed


class TextToImageBase:
    """Same run signature, same JSON-safe `ImageContent` output and same meta, whatever makes the pixels."""

    defaults: GenerationRequest
    request_type: type[GenerationRequest] = GenerationRequest
    _results: ImageResults | None = None
    # Whether `run_async` asks for a batch's images at once (each through the admission gate), or one after another.
    concurrent_batches: bool = True

    def warm_up(self) -> None:
        """Prepare the backend for `run`. Idempotent."""
        raise NotImplementedError

    async def warm_up_async(self) -> None:
        """Prepare the backend for `run_async`. Idempotent."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the backend can serve (after `warm_up`), as far as can be told without spending anything."""
        return self._results is not None

    def upstream_urls(self) -> tuple[str, ...]:
        """The URLs its requests go to, for a readiness probe to reach (none for a local backend)."""
        return ()

    def served_models(self) -> list[str]:
        """The model ids a run may ask for (after `warm_up`): the allow-list when one is set, else the default."""
        assert self._results is not None
        allowed = self._results.settings.allowed_models
        return sorted(allowed) if allowed else [self.defaults.model]

    def _produce(self, request: GenerationRequest) -> bytes:
        raise NotImplementedError

    async def _produce_async(self, request: GenerationRequest) -> bytes:
        raise NotImplementedError

    def _check(self, request: GenerationRequest) -> None:
        """Backend-specific limits, checked after the common ones; raise `InvalidRequestError`."""

    def _requests(self, n: int, **overrides: Any) -> tuple[list[GenerationRequest], ImageResults, bool]:
        """Apply defaults and validate; returns one request per image, the results, and whether the seed was pinned."""
        assert self._results is not None
        if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_IMAGES):
            raise InvalidRequestError(f"n={n!r} must be in 1..{MAX_IMAGES}")
        values = {name: value for name, value in overrides.items() if value is not None}
        pinned = "seed" in values
        values.setdefault("seed", random_seed(MAX_SEED - n + 1))
        request = self.request_type(**{**self.defaults.__dict__, **values})
        request.validate(self._results.settings.allowed_models)
        if request.seed + n - 1 > MAX_SEED:
            raise InvalidRequestError(f"seed={request.seed} must be at most {MAX_SEED - n + 1} for n={n}")
        self._check(request)
        return [replace(request, seed=request.seed + i) for i in range(n)], self._results, pinned

    def validate_request(self, n: int = 1, **params: Any) -> None:
        """Raise `InvalidRequestError` for the `run` parameters that `run` would refuse; nothing is generated."""
        self._requests(n, **params)

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
        :returns: `images`: `n` `ImageContent`s (base64 data, MIME type, and meta with backend, model, provider,
            size, seed, upstream format and ETag), in seed order.
        :raises InvalidRequestError: A parameter is out of range; nothing was sent or computed.
        :raises ImageGenerationError: Generation failed; subclasses say how.
        """
        self.warm_up()
        requests, results, pinned = self._requests(
            n, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": self._images(requests, results, pinned)}

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
    ) -> dict[str, list[ImageContent]]:
        """
        Generate `n` images without blocking the event loop; identical seeded requests in flight share one call.

        With `concurrent_batches`, a batch's images are made at once, each through the admission gate; when one
        fails, the others are cancelled. Parameters, returns and errors are those of `run`.
        """
        await self.warm_up_async()
        requests, results, pinned = self._requests(
            n, prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": await self._images_async(requests, results, pinned)}

    def _images(self, requests: list[GenerationRequest], results: ImageResults, pinned: bool) -> list[ImageContent]:
        """One image per request, one after another."""
        return [results.get(request, self._produce, pinned=pinned) for request in requests]

    async def _images_async(
        self, requests: list[GenerationRequest], results: ImageResults, pinned: bool
    ) -> list[ImageContent]:
        """One image per request: at once with `concurrent_batches` (one failing cancels the others), else in turn."""
        if not self.concurrent_batches or len(requests) == 1:
            return [await results.get_async(r, self._produce_async, pinned=pinned) for r in requests]
        tasks = [asyncio.ensure_future(results.get_async(r, self._produce_async, pinned=pinned)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # after a failure (or cancellation), nobody waits for the others
                task.cancel()
