"""
`ImageToImageBase`: what every image-editing backend adds to its text-to-image twin.

An edit takes an image (and optionally a mask whose fully transparent pixels mark what to change), checks both as
hostile uploads (`components.image_input`), and asks the backend for an image of the request's size from the source
and the prompt, `strength` saying how far it may move from the source. The mask is a promise whatever the backend:
the backend's image is composited onto the source inside the mask only, so every pixel outside it is the source's.

A backend class lists this mixin first, before its text-to-image class: the run signature, the requests and the
final compositing come from here, the producing of pixels from the text-to-image class, which reads the source image,
mask and strength from the `EditRequest` it is given.
"""

import asyncio
from dataclasses import replace
from io import BytesIO
from typing import Any

import pybase64
from haystack import component
from haystack.dataclasses import ImageContent
from PIL import Image

from components.errors import InvalidRequestError
from components.image_codec import encode, sniff
from components.image_input import composite, read_image, read_mask
from components.progress import ProgressCallback, ignore
from components.request import EditRequest, GenerationRequest, OutputFormat
from components.text_to_image_base import TextToImageBase


class ImageToImageBase:
    """The editing run signature and the mask's promise, over a `TextToImageBase` backend."""

    request_type = EditRequest

    def requests(self, n: int = 1, **overrides: Any) -> list[GenerationRequest]:
        """
        Check and decode the uploads, then apply defaults and validate as for text-to-image.

        The request's size defaults to the image's; an image (and its mask) of another size is resized to it.
        """
        image, mask = overrides.pop("image"), overrides.pop("mask", None)
        source = read_image(_content_bytes(image, "image"))
        edit_mask = read_mask(_content_bytes(mask, "mask"), source.size) if mask is not None else None
        asked = (overrides.get("width"), overrides.get("height"))
        if None in asked:
            for name, value in zip(("width", "height"), source.size, strict=True):
                if overrides.get(name) is None:
                    overrides[name] = value
        requests = TextToImageBase.requests(self, n, image=source, mask=edit_mask, **overrides)
        size = (requests[0].width, requests[0].height)
        if size != source.size:
            source = source.resized(size)
            edit_mask = edit_mask.resized(size) if edit_mask is not None else None
            requests = [replace(r, image=source, mask=edit_mask) for r in requests]
        return requests

    def _produce(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        return self._kept_outside_mask(super()._produce(request, report, previews), request)  # type: ignore[misc]

    async def _produce_async(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        raw = await super()._produce_async(request, report, previews)  # type: ignore[misc]
        assert isinstance(request, EditRequest)
        if request.mask is None and sniff(raw)[1:] == (request.width, request.height):
            return raw
        return await asyncio.to_thread(self._kept_outside_mask, raw, request)

    def _kept_outside_mask(self, raw: bytes, request: GenerationRequest) -> bytes:
        """The backend's image, resized to the request's size if it is not, composited onto the source by the mask."""
        assert isinstance(request, EditRequest) and request.image is not None
        image_format, width, height = sniff(raw)
        if request.mask is None and (width, height) == (request.width, request.height):
            return raw
        with Image.open(BytesIO(raw), formats=[image_format.upper()]) as edited:
            edited.load()
            if request.mask is None:
                return encode(edited.convert("RGB").resize((request.width, request.height)), request.output_format)
            return encode(composite(edited, request.image, request.mask), request.output_format)

    @component.output_types(images=list[ImageContent])
    def run(  # noqa: PLR0913
        self,
        image: ImageContent,
        prompt: str,
        mask: ImageContent | None = None,
        strength: float | None = None,
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
        Edit `image` `n` times, with seeds `seed`, `seed+1`, ...

        :param image: The image to edit: a PNG, JPEG or WebP (checked before it is decoded; EXIF orientation applied).
        :param prompt: What the edited image should show.
        :param mask: A PNG or WebP of the image's size whose fully transparent pixels mark what to change; every
            other pixel of the result is the image's own. `None` edits the whole image.
        :param strength: How far from the image, 0 to 1 (default 0.8): near 0 barely changes it, 1 ignores it.
        :param negative_prompt: What to keep out of the image.
        :param width: Width of the result, a multiple of 8 in 64..2048; the image's own by default (the image and
            mask are resized to it).
        :param height: Height of the result, like `width`.
        :param num_inference_steps: Denoising steps; overrides the default.
        :param guidance_scale: Guidance scale; overrides the default.
        :param seed: Seed in 0..2^32-1; a random one is chosen (and returned in the meta) when omitted.
        :param model: Hub model id; overrides the default.
        :param output_format: `png`, `jpeg` or `webp`; overrides the default.
        :param n: How many images, 1..10; image *i* is the edit that seed `seed+i` gives alone.
        :param progress_callback: Called with each progress event (`components.progress`); an exception it raises
            stops the edit.
        :param previews: How many `preview` events per image to send to `progress_callback` (a local backend's).
        :returns: `images`: `n` `ImageContent`s, with the same meta as text-to-image plus `strength` and `edited`.
        :raises InvalidRequestError: A parameter is out of range, or an upload is refused; nothing was sent.
        :raises ImageGenerationError: The edit failed; subclasses say how.
        """
        self.warm_up()  # type: ignore[attr-defined]
        requests = self.requests(
            n, image=image, mask=mask, strength=strength, prompt=prompt, negative_prompt=negative_prompt,
            width=width, height=height, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, model=model, output_format=output_format,
        )  # fmt: skip
        images = self._images(requests, progress_callback or ignore, previews)  # type: ignore[attr-defined]
        return {"images": [_edited(image, request) for image, request in zip(images, requests, strict=True)]}

    @component.output_types(images=list[ImageContent])
    async def run_async(  # noqa: PLR0913
        self,
        image: ImageContent,
        prompt: str,
        mask: ImageContent | None = None,
        strength: float | None = None,
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
        Edit `image` `n` times without blocking the event loop: the uploads are decoded in a worker thread.

        Parameters, returns and errors are those of `run`.
        """
        await self.warm_up_async()  # type: ignore[attr-defined]
        requests = await asyncio.to_thread(
            self.requests, n, image=image, mask=mask, strength=strength, prompt=prompt,
            negative_prompt=negative_prompt, width=width, height=height, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=seed, model=model, output_format=output_format,
        )  # fmt: skip
        images = await self._images_async(requests, progress_callback or ignore, previews)  # type: ignore[attr-defined]
        return {"images": [_edited(image, request) for image, request in zip(images, requests, strict=True)]}


def _edited(image: ImageContent, request: GenerationRequest) -> ImageContent:
    """The meta of an edit: its strength, and whether a mask kept the rest of the source."""
    assert isinstance(request, EditRequest)
    return replace(image, meta={**image.meta, "strength": request.strength, "masked": request.mask is not None})


def _content_bytes(content: object, name: str) -> bytes:
    """
    The bytes of an `ImageContent` input (base64 checked); the MIME type it claims is not trusted.

    Its dict form (`{"base64_image": ...}`) is taken too: a YAML pipeline served by Hayhooks receives its JSON inputs
    as dicts.
    """
    encoded = content.get("base64_image") if isinstance(content, dict) else getattr(content, "base64_image", None)
    if not isinstance(content, (ImageContent, dict)) or not isinstance(encoded, str):
        raise InvalidRequestError(f"{name} must be an image: an ImageContent, or an object with base64_image")
    try:
        return pybase64.b64decode(encoded, validate=True)
    except ValueError as e:
        raise InvalidRequestError(f"{name} is not valid base64") from e
