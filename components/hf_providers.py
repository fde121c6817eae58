"""
What to send to a Hugging Face text-to-image provider and how to read its reply, without doing any I/O.

huggingface_hub's provider helpers decide URL, headers and payload, exactly as `InferenceClient.text_to_image`
does. Everything they would fetch themselves is done here as `Call`s that the transport sends under the request's
deadline and byte caps: the Hub lookup of a model's providers (cached per model), and the download of a result URL.
Nothing reaches huggingface_hub's own session, and no token is read from its stored login.

A generation is a generator (`generation_calls`, or `edit_calls` for the `image-to-image` task) that yields `Call`s
and receives their reply bodies, so the blocking and the async transports run the same steps.
"""

import binascii
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import pybase64
from huggingface_hub import constants
from huggingface_hub.hf_api import InferenceProviderMapping
from huggingface_hub.utils import build_hf_headers

from components.errors import (
    InvalidImageError,
    UnknownModelError,
    UpstreamError,
    UpstreamNotFoundError,
    UpstreamTimeoutError,
)
from components.private_huggingface_hub import ProviderHelper, image_input, prepare_request_offline, provider_helper
from components.request import EditRequest, GenerationRequest
from components.urls import is_http_url

TASK = "text-to-image"
EDIT_TASK = "image-to-image"
# Providers whose text-to-image reply is the image, base64 in JSON, or one result URL. The others (job polling)
# are not offered: `provider="auto"` skips them.
SUPPORTED_PROVIDERS = ("hf-inference", "fal-ai", "replicate", "together", "nscale")
# The same for image-to-image (fal-ai's image-to-image is a polled job; nscale has none).
SUPPORTED_EDIT_PROVIDERS = ("hf-inference", "replicate", "together")
# The HF router's origin as huggingface_hub hard-codes it; requests to it go to the configured router instead.
HF_ROUTER_URL = "{0.scheme}://{0.netloc}".format(urlsplit(constants.INFERENCE_PROXY_TEMPLATE))
HUB_LOOKUP_MAX_BYTES = 1024 * 1024
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")

Purpose = Literal["hub", "generate", "result"]


@dataclass(frozen=True)
class Call:
    """
    One HTTP call to make.

    `purpose`: `hub` (a lookup on the Hub), `generate` (the provider call; its "model loading" 503s are retried),
    `result` (a URL taken from a reply: untrusted, sent no credentials, and refused when it points inside).
    """

    method: str
    url: str
    purpose: Purpose
    max_bytes: int
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    data: bytes | None = None  # a body huggingface_hub encoded itself (its binary-input tasks), with its content type


@dataclass(frozen=True)
class UpstreamTarget:
    """Where requests go: an Inference Provider (or `auto`), or a fixed endpoint URL that overrides it."""

    provider: str
    endpoint_url: str | None
    token: str | None
    router_url: str = HF_ROUTER_URL


class ProviderMappings:
    """The Hub's provider mappings per model, kept `ttl` seconds, at most `max_models` models (least recent out)."""

    def __init__(self, ttl: float = 600.0, max_models: int = 1024) -> None:
        self.ttl = ttl
        self.max_models = max_models
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, list[InferenceProviderMapping]]] = OrderedDict()

    def get(self, model: str) -> list[InferenceProviderMapping] | None:
        """The cached mappings (an empty list: the Hub does not know the model), or None when absent or expired."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is None or entry[0] < time.monotonic():
                self._entries.pop(model, None)
                return None
            self._entries.move_to_end(model)
            return entry[1]

    def put(self, model: str, mappings: list[InferenceProviderMapping]) -> None:
        """Remember `mappings` for `model`."""
        with self._lock:
            self._entries[model] = (time.monotonic() + self.ttl, mappings)
            self._entries.move_to_end(model)
            while len(self._entries) > self.max_models:
                self._entries.popitem(last=False)


def quiet_hub_library() -> None:
    """
    Stop huggingface_hub from calling the Hub on its own (process-wide, as `HF_HUB_DISABLE_TELEMETRY=1` does).

    With its telemetry on, building request headers fetches an agent registry from the Hub through huggingface_hub's
    global session: a call outside every bound of ours, on the first request of a process.
    """
    constants.HF_HUB_DISABLE_TELEMETRY = True


def check_provider(provider: str, task: str = TASK) -> None:
    """Raise `ValueError` unless `provider` is `auto` or a supported provider of `task`."""
    supported = SUPPORTED_EDIT_PROVIDERS if task == EDIT_TASK else SUPPORTED_PROVIDERS
    if provider != "auto" and provider not in supported:
        raise ValueError(f"provider={provider!r} must be 'auto' or one of {', '.join(supported)}")


def generation_calls(
    target: UpstreamTarget, mappings: ProviderMappings, request: GenerationRequest, max_bytes: int
) -> Generator[Call, bytes, bytes]:
    """The calls that make one image; sends `Call`s, receives reply bodies, returns the encoded image."""
    helper, mapping = yield from _route(target, mappings, request.model, TASK)
    parameters = {
        "negative_prompt": request.negative_prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
    }
    call = _provider_call(target, helper, mapping, request.prompt, parameters, request.output_format, max_bytes)
    return (yield from _image_of((yield call), request.output_format, max_bytes))


def edit_calls(
    target: UpstreamTarget, mappings: ProviderMappings, request: EditRequest, max_bytes: int
) -> Generator[Call, bytes, bytes]:
    """
    The calls that edit one image (the `image-to-image` task, as `InferenceClient.image_to_image` sends it).

    The provider gets the source image only, as a PNG of the request's size; the mask is applied afterwards by the
    caller (providers have no common inpainting parameter).
    """
    assert request.image is not None
    helper, mapping = yield from _route(target, mappings, request.model, EDIT_TASK)
    parameters = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "target_size": {"width": request.width, "height": request.height},
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
        "strength": request.strength,
    }
    inputs = image_input(request.image.png(), "image/png")
    call = _provider_call(target, helper, mapping, inputs, parameters, request.output_format, max_bytes)
    return (yield from _image_of((yield call), request.output_format, max_bytes))


def _image_of(reply: bytes, output_format: str, max_bytes: int) -> Generator[Call, bytes, bytes]:
    """The image a provider's reply holds, fetching it when the reply names a result URL."""
    image = _read_reply(reply)
    if isinstance(image, bytes):
        return image
    return (yield Call("GET", image, "result", max_bytes, {"accept": f"image/{output_format}"}))


def _route(
    target: UpstreamTarget, mappings: ProviderMappings, model: str, task: str
) -> Generator[Call, bytes, tuple[ProviderHelper, InferenceProviderMapping]]:
    """The provider helper and model mapping for `model`, from the Hub (through the cache) unless an endpoint is set."""
    if target.endpoint_url is not None:
        url = target.endpoint_url
        mapping = InferenceProviderMapping(
            provider="hf-inference", hf_model_id=url, providerId=url, status="live", task=task
        )
        return provider_helper("hf-inference", task), mapping
    known = mappings.get(model)
    if known is None:
        try:
            body = yield Call("GET", _hub_model_url(model), "hub", HUB_LOOKUP_MAX_BYTES, _hub_headers(target.token))
            known = _parse_mappings(body, model)
        except UpstreamNotFoundError:
            known = []
        mappings.put(model, known)
    supported = SUPPORTED_EDIT_PROVIDERS if task == EDIT_TASK else SUPPORTED_PROVIDERS
    wanted = supported if target.provider == "auto" else (target.provider,)
    for mapping in known:  # in the token owner's order of preference, as the Hub lists them
        if mapping.task == task and mapping.provider in wanted:
            return provider_helper(mapping.provider, task), mapping
    via = "any supported provider" if target.provider == "auto" else f"provider {target.provider}"
    raise UnknownModelError(f"model {model} is not available for {task} through {via}")


def _hub_model_url(model: str) -> str:
    return f"{constants.ENDPOINT}/api/models/{model}?expand=inferenceProviderMapping"


def _hub_headers(token: str | None) -> dict[str, str]:
    return build_hf_headers(token=token or False)  # False: never huggingface_hub's stored login


def _parse_mappings(body: bytes, model: str) -> list[InferenceProviderMapping]:
    """The Hub's `inferenceProviderMapping` (a dict by provider, or a list), as huggingface_hub reads it."""
    try:
        raw = json.loads(body).get("inferenceProviderMapping") or {}
        items = [{**value, "provider": name} for name, value in raw.items()] if isinstance(raw, dict) else raw
        return [InferenceProviderMapping(**{**item, "hf_model_id": model}) for item in items]
    except (ValueError, RecursionError, AttributeError, TypeError, KeyError) as e:
        raise UpstreamError("the Hub answered something that is not a model description") from e


def _provider_call(  # noqa: PLR0913
    target: UpstreamTarget,
    helper: ProviderHelper,
    mapping: InferenceProviderMapping,
    inputs: str | bytes,
    parameters: dict[str, Any],
    output_format: str,
    max_bytes: int,
) -> Call:
    """The provider call huggingface_hub would make, with our mapping and token only, sent to our router URL."""
    params = prepare_request_offline(
        helper,
        mapping,
        target.token,
        inputs=inputs,
        parameters=parameters,
        headers={"Accept": f"image/{output_format}"},
        model=mapping.hf_model_id,
        api_key=target.token,
    )
    headers = {name: str(value) for name, value in params.headers.items()}
    if target.token is None:
        headers.pop("authorization", None)
    url = params.url
    if url.startswith(HF_ROUTER_URL + "/"):
        url = target.router_url.rstrip("/") + url[len(HF_ROUTER_URL) :]
    return Call("POST", url, "generate", max_bytes, headers, params.json, params.data)


def _read_reply(reply: bytes) -> bytes | str:
    """The image (bytes), or the URL (str) the provider left it at. Base64 in JSON is decoded here."""
    if reply.startswith(_IMAGE_MAGIC):
        return reply
    try:
        value = json.loads(reply)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested past the stack
        raise InvalidImageError("the upstream reply is not an image") from e
    if not isinstance(value, dict):
        raise InvalidImageError("the upstream reply is not an image")
    url = _first(value, "images", "url") or _replicate_output(value)  # fal-ai, replicate
    if is_http_url(url):
        return url
    encoded = _first(value, "data", "b64_json")  # together, nscale
    if isinstance(encoded, str):
        return _b64(encoded)
    if "output" in value and value["output"] is None:
        raise UpstreamTimeoutError("the provider did not finish in time")
    raise InvalidImageError("the upstream reply is not an image")


def _first(value: dict, key: str, field_name: str) -> Any:
    items = value.get(key)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0].get(field_name)
    return None


def _replicate_output(value: dict) -> Any:
    output = value.get("output")
    return output[0] if isinstance(output, list) and output else output


def _b64(encoded: str) -> bytes:
    try:
        return pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError("the upstream reply is not an image") from e
