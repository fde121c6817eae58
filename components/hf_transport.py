"""
Calls to a Hugging Face text-to-image upstream: requests built by huggingface_hub, sent over pooled connections.

huggingface_hub's provider helpers decide URL, headers and payload (Inference Providers, the HF router, dedicated
endpoints), exactly as `InferenceClient.text_to_image` does. We send them ourselves so that every call has one
deadline, a byte cap read as a stream, and errors typed by what the client should be told.
"""

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass

import httpx2
from huggingface_hub.inference._common import RequestParameters
from huggingface_hub.inference._providers import get_provider_helper

from components import progress
from components.errors import (
    InvalidImageError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimitedError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from components.request import GenerationRequest

_DEFAULT_RETRY_AFTER = 5
_MAX_LOADING_WAIT = 20.0
_SAFE_REASON_RE = re.compile(r"^[\w .,:;'()=<>+-]{1,200}$")
_UNSAFE_REASON_RE = re.compile(r"https?:|hf_|bearer|token|traceback|/", re.IGNORECASE)


@dataclass(frozen=True)
class UpstreamTarget:
    """Where requests go: an Inference Provider (or `auto`), or a fixed endpoint URL that overrides it."""

    provider: str
    endpoint_url: str | None
    token: str | None


def build_request(target: UpstreamTarget, request: GenerationRequest) -> tuple[RequestParameters, object]:
    """The HTTP request huggingface_hub would send for `request`, and the provider helper that reads its reply."""
    model = target.endpoint_url or request.model
    helper = get_provider_helper(target.provider, task="text-to-image", model=model)
    parameters = {
        "negative_prompt": request.negative_prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
    }
    params = helper.prepare_request(
        inputs=request.prompt,
        parameters=parameters,
        headers={"Accept": f"image/{request.output_format}"},
        model=model,
        api_key=target.token,
    )
    return params, helper


async def post_async(client: httpx2.AsyncClient, params: RequestParameters, deadline: float, max_bytes: int) -> bytes:
    """POST with retries on 'model loading' 503s until `deadline` (a `time.monotonic()` value)."""
    while True:
        started, status = time.monotonic(), "error"
        try:
            async with asyncio.timeout(_remaining(deadline)):
                async with client.stream("POST", params.url, json=params.json, headers=params.headers) as response:
                    status = response.status_code
                    _raise_for_status(response.status_code, response.headers, await _read_error_body(response))
                    _check_declared_size(response.headers, max_bytes)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        _append_capped(body, chunk, max_bytes)
                    return bytes(body)
        except UpstreamUnavailableError as e:
            wait = _loading_wait(e, deadline)
        except (TimeoutError, httpx2.TimeoutException) as e:
            status = "timeout"
            raise UpstreamTimeoutError("the upstream did not answer in time") from e
        except httpx2.TransportError as e:
            raise UpstreamError("the upstream could not be reached") from e
        finally:
            progress.report({"phase": "upstream", "status": status, "seconds": time.monotonic() - started})
        await asyncio.sleep(wait)  # the upstream is loading the model: try again


def post(client: httpx2.Client, params: RequestParameters, deadline: float, max_bytes: int) -> bytes:
    """The blocking twin of `post_async`, with the deadline checked between chunks."""
    while True:
        try:
            with client.stream(
                "POST", params.url, json=params.json, headers=params.headers, timeout=_remaining(deadline)
            ) as response:
                _raise_for_status(response.status_code, response.headers, _read_error_body_sync(response))
                _check_declared_size(response.headers, max_bytes)
                body = bytearray()
                for chunk in response.iter_bytes():
                    _append_capped(body, chunk, max_bytes)
                    _remaining(deadline)
                return bytes(body)
        except UpstreamUnavailableError as e:
            time.sleep(_loading_wait(e, deadline))
        except httpx2.TimeoutException as e:
            raise UpstreamTimeoutError("the upstream did not answer in time") from e
        except httpx2.TransportError as e:
            raise UpstreamError("the upstream could not be reached") from e


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise UpstreamTimeoutError("the upstream did not answer in time")
    return remaining


def _loading_wait(error: UpstreamUnavailableError, deadline: float) -> float:
    """How long to wait before retrying a 503, or re-raise it when the deadline would pass first."""
    wait = min(max(error.retry_after, 0.5), _MAX_LOADING_WAIT)
    if time.monotonic() + wait >= deadline:
        raise error
    return wait


async def _read_error_body(response: httpx2.Response) -> bytes:
    return await response.aread() if response.status_code >= 400 else b""


def _read_error_body_sync(response: httpx2.Response) -> bytes:
    return response.read() if response.status_code >= 400 else b""


def _check_declared_size(headers: httpx2.Headers, max_bytes: int) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise InvalidImageError("the upstream image is larger than the size cap")


def _append_capped(body: bytearray, chunk: bytes, max_bytes: int) -> None:
    body += chunk
    if len(body) > max_bytes:
        raise InvalidImageError("the upstream image is larger than the size cap")


def _raise_for_status(status: int, headers: httpx2.Headers, body: bytes) -> None:
    if status < 400:
        return
    error_json = _json_object(body)
    if status == 429:
        raise UpstreamRateLimitedError("the upstream is rate limiting", _retry_after(headers, error_json))
    if status == 503:
        raise UpstreamUnavailableError("the upstream is unavailable", _retry_after(headers, error_json))
    if status in (401, 403):
        raise UpstreamAuthError("upstream rejected the credentials")
    if status in (400, 422):
        raise UpstreamRejectedError("the upstream rejected the parameters", _safe_reason(error_json))
    raise UpstreamError(f"the upstream answered {status}")


def _json_object(body: bytes) -> dict:
    try:
        value = json.loads(body[:4096])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _retry_after(headers: httpx2.Headers, error_json: dict) -> int:
    """Seconds from `Retry-After`, else from HF's `estimated_time`, else a default; always at least 1."""
    header = headers.get("retry-after", "")
    if header.isdigit():
        return max(1, int(header))
    estimated = error_json.get("estimated_time")
    if isinstance(estimated, (int, float)) and 0 < estimated < 3600:
        return max(1, math.ceil(estimated))
    return _DEFAULT_RETRY_AFTER


def _safe_reason(error_json: dict) -> str | None:
    """The upstream's error text when it is short, plain and names no URL, path or credential."""
    reason = error_json.get("error")
    if isinstance(reason, list):
        reason = "; ".join(str(item) for item in reason)
    if not isinstance(reason, str) or not _SAFE_REASON_RE.fullmatch(reason) or _UNSAFE_REASON_RE.search(reason):
        return None
    return reason
