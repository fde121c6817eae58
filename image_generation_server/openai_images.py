"""
OpenAI's Images API on the image pipelines: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

Requests take OpenAI's fields on OpenAI's terms, plus this server's `negative_prompt`, `seed`, `num_inference_steps`
and `guidance_scale` (and for edits `strength`); a setting that cannot be honoured is a 400 that says so, never
silently ignored. An edit is a multipart form, as OpenAI's SDKs send it: one `image`, an optional `mask`, and the other
fields as text. Errors use OpenAI's envelope and the statuses its SDKs map to exception classes (400 where the native
route says 422). `HTTPGuard` applies the same API keys, body cap and cancel-on-disconnect as on the native route.
"""

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import pybase64
from fastapi import APIRouter, FastAPI, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from haystack.dataclasses import ImageContent
from pydantic import BaseModel, Field, ValidationError
from starlette.formparsers import MultiPartException

from components.image_codec import recompress
from components.request import MASK, Batch, CommonParameters, EditParameters, Streaming, Strength
from image_generation_server import answers
from image_generation_server.generation import (
    EDIT_PIPELINE_NAME,
    edit,
    edit_size,
    generate,
    generate_watched,
    image_size,
    served_models,
    served_pipeline,
)
from image_generation_server.private_starlette import move_ahead
from image_generation_server.responses import classify, openai_error, validation_message
from image_generation_server.settings import Settings
from image_generation_server.uploads import form_model, image_content

PREFIX = "/v1/"
SIZE_PATTERN = r"^(auto|[1-9][0-9]{1,3}x[1-9][0-9]{1,3})$"
MAX_USER_CHARS = 256
# The parameters the component names in its messages, and the OpenAI field that carries them here.
_PARAMS = {"width": "size", "height": "size"}
_PARAM_RE = re.compile(r"^([a-z_]+)[= ]")

ERROR_BODY = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "invalid input: a bad value, an unknown field, or a setting this server cannot honour",
    "401": "missing or wrong API key (when `IMAGE_GENERATION_API_KEYS` is set)",
    "413": "request body over 64 KB",
    "429": "the upstream is rate limiting; `Retry-After` says when to retry",
    "502": "the upstream failed or sent something that is not the image",
    "503": "the model is loading, or the server's queue is full; `Retry-After` says when to retry",
    "504": "the upstream or the local model ran past the deadline",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": ERROR_BODY}}}
    for status, text in _ERRORS.items()
}


class ImageGenerationRequest(Streaming, Batch, CommonParameters):
    """
    OpenAI's `images.generate` body: the parameters every door takes, `n`, and OpenAI's own fields.

    `model` is one that `GET /v1/models` lists; `negative_prompt`, `seed`, `num_inference_steps` and
    `guidance_scale` are this server's extensions. `size` stands for `width` and `height`.
    """

    size: Annotated[str, Field(pattern=SIZE_PATTERN)] | None = Field(
        None, description="`WIDTHxHEIGHT`, each a multiple of 8 from 64 to 2048, or `auto` (the default size)."
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None,
        description="`b64_json` (the default), or `url`: a link to the image store, no API key needed to fetch it.",
    )
    output_compression: Annotated[int, Field(strict=True, ge=0, le=100)] | None = Field(
        None, description="JPEG/WebP quality, 0 to 100."
    )
    quality: Literal["auto", "standard", "low", "medium", "high", "hd"] | None = Field(
        None, description="`auto` or `standard`; the others are refused (set `num_inference_steps` instead)."
    )
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="`auto` or `opaque`; images are always opaque, so `transparent` is refused."
    )
    style: Literal["vivid", "natural"] | None = Field(
        None, description="DALL-E 3's style presets are not offered: describe the style in the prompt."
    )
    user: Annotated[str, Field(max_length=MAX_USER_CHARS)] | None = Field(
        None, description="An end-user id; accepted and not stored."
    )


class ImageEditRequest(ImageGenerationRequest):
    """
    OpenAI's `images.edit` fields besides its files.

    Those of `images.generate`, OpenAI's `input_fidelity`, and this server's `strength`. `size` defaults to the
    image's own; another size resizes the image and the mask to it.
    """

    strength: Strength | None = EditParameters.model_fields["strength"]
    input_fidelity: Literal["low", "high"] | None = Field(
        None, description="Not offered: set `strength` instead (near 0 stays close to the image)."
    )


# A form's values are text: the edit's fields read as their types, with the same limits.
ImageEditForm = form_model(ImageEditRequest)
# The multipart body's schema, for the OpenAPI document (the route reads the form itself, with its own limits).
EDIT_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The image to edit: PNG, JPEG or WebP."},
        "mask": {"type": "string", "format": "binary", "description": MASK},
        **ImageEditRequest.model_json_schema()["properties"],
    },
}
MAX_FORM_FIELDS = len(ImageEditRequest.model_fields) + 4


class ImageData(BaseModel):
    """One generated image: its base64 data, or the URL it can be downloaded from (`response_format`)."""

    b64_json: str | None = None
    url: str | None = None
    seed: int


class ImagesResponse(BaseModel):
    """OpenAI's images response; each item also carries its seed."""

    created: int
    data: list[ImageData]
    output_format: str
    size: str
    quality: str
    background: str


class Model(BaseModel):
    """One entry of OpenAI's model list."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    """OpenAI's model list."""

    object: Literal["list"] = "list"
    data: list[Model]


class Refused(Exception):
    """A request this door cannot honour: a 400 naming the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


router = APIRouter(prefix="/v1", tags=["OpenAI-compatible images"])
# The answer's copies of the images: their base64, and one image at a time beside it (sent, stored, or recompressed);
# a stream's image: its base64, its recompressed copy, and the event that carries it (previews are smaller).
COPIES = 2
STREAM_COPIES = 3
PREVIEWS = frozenset({"preview"})  # the progress events a stream carries
STREAM_EVENT = {
    "type": "object",
    "description": "`event: image_generation.partial_image` or `event: image_generation.completed` (OpenAI's "
    "`ImageGenPartialImageEvent` and `ImageGenCompletedEvent`), or `event: error` with OpenAI's error body.",
}
STREAMED = {"description": "The images; with `stream`, server-sent events", "content": {
    "text/event-stream": {"schema": STREAM_EVENT}}}  # fmt: skip


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    responses={200: STREAMED, **ERROR_RESPONSES},
    response_model_exclude_none=True,
    summary="Generate images (OpenAI Images API)",
)
async def create_images(body: ImageGenerationRequest, request: Request) -> Any:
    """
    Generate `n` images from a prompt, as OpenAI's `images.generate` does; each comes back as base64, or as a URL.

    Works with OpenAI's SDKs and OpenAI-compatible clients (set their base URL to this server's `/v1`). With
    `stream`, the answer is OpenAI's server-sent events: up to `partial_images` previews, then the image, which is
    the same bytes as without `stream`.
    """
    try:
        params = _pipeline_params(body)
    except Refused as e:
        return openai_error(400, str(e), param=e.param)
    if body.stream:

        async def start() -> AsyncIterator[dict[str, Any] | list[ImageContent]]:
            size = image_size(served_pipeline(request.app), params.get("width"), params.get("height"))
            answers.reserve(1, *size, copies=STREAM_COPIES)
            return generate_watched(request.app, PREVIEWS, body.partial_images or 0, **params)

        return await _streamed(body, start)
    try:
        size = image_size(served_pipeline(request.app), params.get("width"), params.get("height"))
        share = answers.reserve(body.n, *size, copies=COPIES)
        images = await generate(request.app, **params)
    except Exception as e:
        failure = classify(e)
        return openai_error(failure.status, failure.message, param=_param_of(failure), headers=failure.headers)
    return await _images_response(body, images, request, share)


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    responses={**ERROR_RESPONSES, "413": {**ERROR_RESPONSES["413"], "description": "body over the upload cap"}},
    response_model_exclude_none=True,
    summary="Edit an image (OpenAI Images API)",
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EDIT_FORM_SCHEMA}}}},
)
async def edit_images(request: Request) -> Any:
    """
    Edit an image `n` times from a prompt, as OpenAI's `images.edit` does; with a mask, only where it is transparent.

    One `image` (several are refused), an optional `mask` of the image's size whose fully transparent pixels mark
    what to change (every other pixel of each answer is the image's own, exactly), and `strength` for how far from the
    image to go. Each answer comes back as base64, or as a URL.
    """
    try:
        form = await request.form(max_files=3, max_fields=MAX_FORM_FIELDS)
    except (MultiPartException, ValueError):
        return openai_error(400, "the body must be a multipart form with the image and the prompt")
    try:
        uploads, body = _edit_form(form)
        params = _edit_params(body)
    except Refused as e:
        return openai_error(400, str(e), param=e.param)
    except ValidationError as e:
        param, message = validation_message(e.errors())
        return openai_error(400, message, param=param)
    inputs = {**params, **uploads}

    async def size() -> tuple[int, int]:
        return await edit_size(served_pipeline(request.app, EDIT_PIPELINE_NAME), **inputs)

    if body.stream:

        async def start() -> AsyncIterator[dict[str, Any] | list[ImageContent]]:
            answers.reserve(1, *await size(), copies=STREAM_COPIES)
            return generate_watched(request.app, PREVIEWS, body.partial_images or 0, edit, **inputs)

        return await _streamed(body, start)
    try:
        share = answers.reserve(body.n, *await size(), copies=COPIES)
        images = await edit(request.app, **inputs)
    except Exception as e:
        failure = classify(e)
        return openai_error(failure.status, failure.message, param=_param_of(failure), headers=failure.headers)
    return await _images_response(body, images, request, share)


async def _images_response(
    body: ImageGenerationRequest, images: list[ImageContent], request: Request, share: answers.Share | None = None
) -> Any:
    """The images in OpenAI's response shape: base64 or stored URLs, recompressed when asked; `share` shrunk to them."""
    try:
        output_format = images[0].meta["format"]
        data = [image.base64_image for image in images]
        if body.output_compression is not None:
            data = await asyncio.to_thread(_recompressed, data, output_format, body.output_compression)
        if share is not None:
            share.shrink_to(answers.base64_bytes(data) + max(len(b64) for b64 in data))
        seeds = [image.meta["seed"] for image in images]
        answer = {
            "created": int(time.time()),
            "output_format": output_format,
            "size": f"{images[0].meta['width']}x{images[0].meta['height']}",
            "quality": "standard",
            "background": "opaque",
        }
        if body.response_format != "url":
            return _b64_answer(answer, data, seeds)
        store, origin = request.app.state.image_store, f"{request.url.scheme}://{request.url.netloc}"
        stored = [await asyncio.to_thread(store.put, pybase64.b64decode(b64), output_format) for b64 in data]
        items = [ImageData(url=origin + image.url, seed=seed) for image, seed in zip(stored, seeds, strict=True)]
    except Exception as e:  # the store's failures too (not writable, an image over its budget): a 503
        failure = classify(e)
        return openai_error(failure.status, failure.message, param=_param_of(failure), headers=failure.headers)
    return ImagesResponse(data=items, **answer)


def _b64_answer(answer: dict[str, Any], data: list[str], seeds: list[int]) -> Response:
    """
    The `b64_json` answer, written an image at a time: the JSON around the images is small, the images are not.

    Serialized whole, the answer would be two more copies of every image (the JSON text, then its bytes).
    """
    head = json.dumps({"created": answer["created"]})[:-1].encode() + b',"data":['
    tail = b"]," + json.dumps({k: v for k, v in answer.items() if k != "created"})[1:].encode()
    items = [(b'{"b64_json":"', f'","seed":{seed}}}'.encode()) for seed in seeds]
    length = len(head) + len(tail) + max(len(data) - 1, 0) + sum(len(a) + len(b) for a, b in items)
    length += answers.base64_bytes(data)

    async def pieces() -> AsyncIterator[bytes]:
        yield head
        for index, (b64, (before, after)) in enumerate(zip(data, items, strict=True)):
            yield (b"," if index else b"") + before
            yield b64.encode("ascii")
            yield after
        yield tail

    return StreamingResponse(pieces(), media_type="application/json", headers={"Content-Length": str(length)})


@router.get("/models", response_model=ModelList, responses={503: ERROR_RESPONSES["503"]}, summary="List image models")
async def list_models(request: Request) -> Any:
    """The image models this server serves, in OpenAI's list shape: the `model` values a request may name."""
    try:
        models = served_models(request.app)
    except Exception as e:
        failure = classify(e)
        return openai_error(failure.status, failure.message, headers=failure.headers)
    created = request.app.state.started
    return ModelList(data=[Model(id=model, created=created, owned_by="image-generation") for model in models])


def install(app: FastAPI, settings: Settings) -> None:
    """
    Add the routes ahead of Hayhooks' own `GET /v1/models` (its chat models), which `routes.prune` removes.

    Validation errors here come in OpenAI's envelope through the app's handler (`responses`), by the route's
    row in the inventory.
    """
    app.state.started = int(time.time())
    app.include_router(router)
    move_ahead(app)


async def _streamed(
    body: ImageGenerationRequest, start: Callable[[], Awaitable[AsyncIterator[dict[str, Any] | list[ImageContent]]]]
) -> Any:
    """
    OpenAI's image stream: a partial image event per preview, then the completed event, or `event: error`.

    `start()` runs the generation or the edit. Nothing is sent until the first preview or the image is there, so
    that a refusal or a failure before that is an ordinary error response with its status (422 → 400, 429, 503...).
    A client that disconnects cancels the generation (the guard cancels the route, which closes the generation's
    iterator).
    """
    try:
        watched = await start()
        first = await anext(watched)
    except Exception as e:
        failure = classify(e)
        return openai_error(failure.status, failure.message, param=_param_of(failure), headers=failure.headers)
    common = {"background": "opaque", "quality": "auto"}

    async def events() -> AsyncIterator[str]:
        try:
            item: dict[str, Any] | list[ImageContent] = first
            while isinstance(item, dict):
                yield _sse("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": item["image"],
                    "partial_image_index": item["index"], "created_at": int(time.time()), "size": body.size or "auto",
                    "output_format": item["mime_type"].removeprefix("image/"), **common,
                })  # fmt: skip
                item = await anext(watched)
            [image] = item
            data = image.base64_image
            if body.output_compression is not None:
                [data] = await asyncio.to_thread(_recompressed, [data], image.meta["format"], body.output_compression)
            yield _sse("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": data, "created_at": int(time.time()),
                "size": f"{image.meta['width']}x{image.meta['height']}", "output_format": image.meta["format"],
                "usage": NO_USAGE, "seed": image.meta["seed"], **common,
            })  # fmt: skip
        except Exception as e:
            failure = classify(e)
            error = {"message": failure.message, "type": "server_error", "param": _param_of(failure), "code": None}
            yield _sse("error", {"type": "error", "error": error})
        finally:
            await watched.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


# OpenAI reports tokens for its GPT image models; a diffusion model has none to report.
NO_USAGE = {
    "input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
    "total_tokens": 0,
}  # fmt: skip


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _pipeline_params(body: ImageGenerationRequest) -> dict[str, Any]:
    """The component's run inputs for `body`, or `Refused` for a setting this server cannot honour."""
    if body.stream:
        if body.n != 1:
            raise Refused("n", "stream=true sends one image: set n to 1")
        if body.response_format == "url":
            raise Refused("response_format", "stream=true sends the image as base64: leave response_format out")
    elif body.partial_images:
        raise Refused("partial_images", "partial_images applies with stream=true only")
    if body.quality not in (None, "auto", "standard"):
        raise Refused("quality", f"quality={body.quality!r} is not offered; set num_inference_steps instead")
    if body.background == "transparent":
        raise Refused("background", "background='transparent' is not offered: images are opaque")
    if body.style is not None:
        raise Refused("style", "style presets are not offered; describe the style in the prompt")
    if body.output_compression is not None and body.output_format in (None, "png"):
        raise Refused("output_compression", "output_compression applies to jpeg and webp only")
    params: dict[str, Any] = {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "model": body.model, "n": body.n,
        "seed": body.seed, "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
        "output_format": body.output_format,
    }  # fmt: skip
    if body.size not in (None, "auto"):
        width, height = body.size.split("x")
        params.update(width=int(width), height=int(height))
    return params


def _edit_params(body: ImageEditRequest) -> dict[str, Any]:
    """The editing component's run inputs for `body` (its image and mask apart), or `Refused`."""
    if body.input_fidelity is not None:
        raise Refused("input_fidelity", "input_fidelity is not offered; set strength instead")
    return {**_pipeline_params(body), "strength": body.strength}


def _edit_form(form: Any) -> tuple[dict[str, ImageContent | None], ImageEditRequest]:
    """The form's image and mask (as the editing component's inputs) and its fields; `Refused` for what is not."""
    files: dict[str, list[UploadFile]] = {}
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            if name in fields:
                raise Refused(name[:64], f"{name[:64]!r} is given more than once")
            fields[name] = value
        else:
            files.setdefault("image" if name == "image[]" else name, []).append(value)
    for name in files.keys() - {"image", "mask"}:
        raise Refused(name[:64], f"unknown file {name[:64]!r}: send an image and optionally a mask")
    images, masks = files.get("image", []), files.get("mask", [])
    if not images:
        raise Refused("image", "image is required: the file to edit")
    if len(images) > 1:
        raise Refused("image", "one image per edit: several input images are not supported here")
    if len(masks) > 1:
        raise Refused("mask", "one mask per edit")
    body = ImageEditForm.model_validate(fields)
    uploads = {
        "image": image_content(images[0].file.read()),
        "mask": image_content(masks[0].file.read()) if masks else None,
    }
    return uploads, body


def _param_of(failure: Any) -> str | None:
    """The request field a validation message names, in this door's terms (width and height are `size`)."""
    match = _PARAM_RE.match(failure.message) if failure.status == 422 else None
    param = _PARAMS.get(match.group(1), match.group(1)) if match else None
    return param if param in ImageEditRequest.model_fields or param in ("image", "mask") else None


def _recompressed(data: list[str], output_format: str, quality: int) -> list[str]:
    return [
        pybase64.b64encode_as_string(recompress(pybase64.b64decode(b64, validate=True), output_format, quality))
        for b64 in data
    ]
