"""
`TextToImageBase`: the inputs, defaults, validation and output that every text-to-image backend shares.

A backend subclasses it (and is decorated with `@component`), sets `defaults` in `__init__`, creates `_results` in
`warm_up()`, and supplies `_produce` / `_produce_async`, which turn a validated request into encoded image bytes.
"""

from typing import Any

from haystack import component
from haystack.dataclasses import ImageContent

from components.image_results import ImageResults
from components.request import GenerationRequest, OutputFormat, random_seed


class TextToImageBase:
    """Same run signature, same JSON-safe `ImageContent` output and same meta, whatever makes the pixels."""

    defaults: GenerationRequest
    _results: ImageResults | None = None

    def warm_up(self) -> None:
        """Prepare the backend for `run`. Idempotent."""
        raise NotImplementedError

    async def warm_up_async(self) -> None:
        """Prepare the backend for `run_async`. Idempotent."""
        raise NotImplementedError

    def _produce(self, request: GenerationRequest) -> bytes:
        raise NotImplementedError

    async def _produce_async(self, request: GenerationRequest) -> bytes:
        raise NotImplementedError

    def _check(self, request: GenerationRequest) -> None:
        """Backend-specific limits, checked after the common ones; raise `InvalidRequestError`."""

    def _request(self, **overrides: Any) -> tuple[GenerationRequest, ImageResults, bool]:
        """Apply defaults and validate; returns the request, the results, and whether the caller pinned the seed."""
        assert self._results is not None
        values = {name: value for name, value in overrides.items() if value is not None}
        pinned = "seed" in values
        values.setdefault("seed", random_seed())
        request = GenerationRequest(**{**self.defaults.__dict__, **values})
        request.validate(self._results.settings.allowed_models)
        self._check(request)
        return request, self._results, pinned

    def validate_request(self, **params: Any) -> None:
        """Raise `InvalidRequestError` for the `run` parameters that `run` would refuse; nothing is generated."""
        self._request(**params)

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
    ) -> dict[str, list[ImageContent]]:
        """
        Generate one image.

        :param prompt: What to draw.
        :param negative_prompt: What to keep out of the image.
        :param width: Width in pixels, a multiple of 8 in 64..2048; overrides the default.
        :param height: Height in pixels, a multiple of 8 in 64..2048; overrides the default.
        :param num_inference_steps: Denoising steps; overrides the default.
        :param guidance_scale: Guidance scale; overrides the default.
        :param seed: Seed in 0..2^32-1; a random one is chosen (and returned in the meta) when omitted.
        :param model: Hub model id; overrides the default.
        :param output_format: `png`, `jpeg` or `webp`; overrides the default.
        :returns: `images`: one `ImageContent` (base64 data, MIME type, and meta with backend, model, provider,
            size, seed, upstream format and ETag).
        :raises InvalidRequestError: A parameter is out of range; nothing was sent or computed.
        :raises ImageGenerationError: Generation failed; subclasses say how.
        """
        self.warm_up()
        request, results, pinned = self._request(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": [results.get(request, self._produce, pinned=pinned)]}

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
    ) -> dict[str, list[ImageContent]]:
        """
        Generate one image without blocking the event loop; identical seeded requests in flight share one call.

        Parameters, returns and errors are those of `run`.
        """
        await self.warm_up_async()
        request, results, pinned = self._request(
            prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
            output_format=output_format,
        )  # fmt: skip
        return {"images": [await results.get_async(request, self._produce_async, pinned=pinned)]}
