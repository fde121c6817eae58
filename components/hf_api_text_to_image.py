"""`HuggingFaceAPITextToImage`: text-to-image through Hugging Face Inference Providers or an inference endpoint."""

import asyncio
import ipaddress
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from haystack import component, default_from_dict, default_to_dict, logging
from haystack.utils import Secret, deserialize_secrets_inplace
from huggingface_hub import constants

from components.byte_budget import ByteBudget
from components.errors import MissingTokenError, UpstreamAuthError
from components.hf_providers import (
    HF_ROUTER_URL,
    TASK,
    ProviderMappings,
    UpstreamTarget,
    check_provider,
    generation_calls,
    quiet_hub_library,
)
from components.hf_transport import Bounds, Network, run_calls, run_calls_async
from components.progress import ProgressCallback
from components.request import GenerationRequest, OutputFormat
from components.settings import generator_settings, value_or
from components.text_to_image_base import TextToImageBase
from components.urls import is_http_url

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "black-forest-labs/FLUX.1-schnell"
DEFAULT_MAX_INFLIGHT_BYTES = 512 * 1024 * 1024


@component
class HuggingFaceAPITextToImage(TextToImageBase):
    """
    Generates images from text with the Hugging Face Inference API.

    Requests are built by `huggingface_hub` (Inference Providers, `provider="auto"` by default). When an endpoint
    URL is set (`endpoint_url`), every request goes to that URL instead: a dedicated
    Inference Endpoint or any server speaking the HF text-to-image protocol. The token is only ever sent there or to
    Hugging Face, never to a URL chosen by a caller: `model` must be a Hub model id. The token comes only from the
    `token` secret (`HF_API_TOKEN`, then `HF_TOKEN`) or the file named by `HF_TOKEN_FILE`, never from
    huggingface_hub's stored login.

    Usage:
    ```python
    generator = HuggingFaceAPITextToImage()
    image = generator.run(prompt="A cat sitting on a rainbow", seed=42)["images"][0]
    ```

    Settings are init parameters only: the component reads no settings from the environment (the server applies
    its own settings to them when it loads the pipeline YAML). Left at `None`, a built-in default applies.
    """

    task = TASK  # the Inference Providers task its requests are for

    def __init__(  # noqa: PLR0913
        self,
        model: str = DEFAULT_MODEL,
        provider: str = "auto",
        endpoint_url: str | None = None,
        token: Secret = Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False),  # noqa: B008
        width: int = 512,
        height: int = 512,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        output_format: OutputFormat = "png",
        allowed_models: list[str] | None = None,
        timeout: float | None = None,
        max_image_bytes: int | None = None,
        router_url: str | None = None,
        max_inflight_bytes: int | None = None,
        result_url_allow: list[str] | None = None,
    ) -> None:
        """
        Create the component; nothing is resolved or connected until `warm_up()`.

        :param model: Default Hub model id, used when a run passes none.
        :param provider: Inference Provider name (`hf-inference`, `fal-ai`, `replicate`, `together`, `nscale`), or
            `auto` for the first of those the Hub lists for the model, in the account's order of preference.
        :param endpoint_url: URL of an HF-protocol inference server that every request goes to; else the HF
            router.
        :param token: The Hugging Face token, from `HF_API_TOKEN` or `HF_TOKEN` by default; when it resolves to
            nothing, the file named by `HF_TOKEN_FILE` (a Docker secret, say) is read.
        :param width: Default width in pixels.
        :param height: Default height in pixels.
        :param num_inference_steps: Default number of denoising steps; `None` lets the model decide.
        :param guidance_scale: Default guidance scale; `None` lets the model decide.
        :param output_format: Default image format: `png`, `jpeg` or `webp`.
        :param allowed_models: Model ids a run may ask for; else any Hub id, or with an endpoint only `model` (it
            serves one model, whatever a request names).
        :param timeout: Deadline in seconds for one image, retries included; else 120.
        :param max_image_bytes: Largest upstream reply accepted; else 32 MiB.
        :param router_url: Base URL of the Inference Providers router (a proxy in front of it); else the HF router.
        :param max_inflight_bytes: Bytes of upstream replies all runs may hold at once while reading them; else
            512 MiB. At least `max_image_bytes`.
        :param result_url_allow: Networks (`10.1.0.0/16`) a provider's result URL may point into although private
            or loopback; else none.
        """
        for name, url in (("endpoint_url", endpoint_url), ("router_url", router_url)):
            if url is not None and not is_http_url(url):
                raise ValueError(f"{name}={url!r} must be an http(s) URL with a host")
        check_provider(provider, self.task)
        self.model = model
        self.provider = provider
        self.endpoint_url = endpoint_url
        self.token = token
        self.defaults = GenerationRequest(
            prompt="-", negative_prompt=None, width=width, height=height, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, seed=0, model=model, output_format=output_format,
        )  # fmt: skip
        self.defaults.validate()
        self.allowed_models = allowed_models
        self.timeout = timeout
        self.max_image_bytes = max_image_bytes
        self.router_url = router_url
        self.max_inflight_bytes = max_inflight_bytes
        self.result_url_allow = result_url_allow
        self._backend = {"backend": "huggingface_api", "provider": provider}
        self._target: UpstreamTarget | None = None
        self._mappings = ProviderMappings()
        self._bytes: ByteBudget | None = None
        self._allowed_networks: tuple[Network, ...] = ()
        self._client: httpx2.Client | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _resolve(self) -> None:
        if self.settings is not None:
            return
        endpoint_url = self.endpoint_url
        quiet_hub_library()
        token = self.token.resolve_value() or _token_file()
        router_url = value_or(self.router_url, HF_ROUTER_URL).rstrip("/")
        self._target = UpstreamTarget(self.provider, endpoint_url, token, router_url)
        inflight = value_or(self.max_inflight_bytes, DEFAULT_MAX_INFLIGHT_BYTES)
        self._bytes = ByteBudget(inflight)
        self._allowed_networks = tuple(ipaddress.ip_network(item) for item in self.result_url_allow or ())
        if token is None and endpoint_url is None:
            logger.warning(
                "No Hugging Face token (HF_API_TOKEN, HF_TOKEN or HF_TOKEN_FILE) and no IMAGE_GENERATION_ENDPOINT "
                "(endpoint_url): Hugging Face will refuse the requests"
            )
        settings = generator_settings(
            allowed_models=self.allowed_models, timeout=self.timeout, max_image_bytes=self.max_image_bytes
        )
        if endpoint_url is not None and settings.allowed_models is None:
            # An endpoint serves one model, whatever a request names: `model` may only be that one, so that the marks
            # never name a model that did not make the image.
            settings = replace(settings, allowed_models=frozenset((self.model,)))
        if inflight < settings.max_image_bytes:
            raise ValueError("max_inflight_bytes must be at least max_image_bytes")
        backend = "endpoint" if endpoint_url else self.provider
        self._backend = {"backend": "huggingface_api", "provider": backend}
        self.settings = settings
        logger.info("Text-to-image upstream: {backend}", backend=backend)

    def upstream_urls(self) -> tuple[str, ...]:
        """The endpoint when one is set, else the HF router and the Hub (the provider lookup); after `warm_up`."""
        assert self._target is not None
        if self._target.endpoint_url is not None:
            return (self._target.endpoint_url,)
        return (self._target.router_url, constants.ENDPOINT)

    def backend_meta(self) -> dict[str, Any]:
        """The meta every image carries about the backend: `backend`, and `provider` (`endpoint` with an endpoint)."""
        return self._backend

    def warm_up(self) -> None:
        """
        Resolve token and settings and open the blocking connection pool. Idempotent.

        The pools have no cap of their own: whoever runs the component bounds the calls in flight.
        """
        self._resolve()
        if self._client is None:
            limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
            self._client = httpx2.Client(limits=limits, timeout=None, trust_env=False)

    async def warm_up_async(self) -> None:
        """
        Resolve token and settings and open the async connection pool on the running loop. Idempotent.

        A pool belongs to the loop that opened it: run from another loop, the component opens a new one there.
        """
        self._resolve()
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session_loop = loop
            connector = aiohttp.TCPConnector(limit=0)
            # Deadlines are the request's (`Bounds`), replies are read raw, and no proxy or netrc is read.
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False, trust_env=False
            )

    def close(self) -> None:
        """Close the blocking connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def close_async(self) -> None:
        """Close the async connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component; the token is stored as a reference to its environment variables."""
        d = self.defaults
        return default_to_dict(
            self,
            model=self.model,
            provider=self.provider,
            endpoint_url=self.endpoint_url,
            token=self.token.to_dict(),
            width=d.width,
            height=d.height,
            num_inference_steps=d.num_inference_steps,
            guidance_scale=d.guidance_scale,
            output_format=d.output_format,
            allowed_models=self.allowed_models,
            timeout=self.timeout,
            max_image_bytes=self.max_image_bytes,
            router_url=self.router_url,
            max_inflight_bytes=self.max_inflight_bytes,
            result_url_allow=self.result_url_allow,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HuggingFaceAPITextToImage":
        """Deserialize the component."""
        deserialize_secrets_inplace(data["init_parameters"], keys=["token"])
        return default_from_dict(cls, data)

    def _bounds(self) -> tuple[float, ByteBudget]:
        assert self.settings is not None and self._bytes is not None
        return time.monotonic() + self.settings.timeout, self._bytes

    def _calls(self, request: GenerationRequest) -> Any:
        assert self._target is not None and self.settings is not None
        return generation_calls(self._target, self._mappings, request, self.settings.max_image_bytes)

    def _produce(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        assert self._client is not None
        deadline, budget = self._bounds()
        with budget.lease() as lease, self._token_refusals():
            bounds = Bounds(deadline, lease, report, self._allowed_networks)
            return run_calls(self._client, self._calls(request), bounds)

    async def _produce_async(self, request: GenerationRequest, report: ProgressCallback, previews: int) -> bytes:
        assert self._session is not None
        deadline, budget = self._bounds()
        with budget.lease() as lease, self._token_refusals():
            bounds = Bounds(deadline, lease, report, self._allowed_networks)
            return await run_calls_async(self._session, self._calls(request), bounds)

    @contextmanager
    def _token_refusals(self) -> Iterator[None]:
        """A 401/403 to a request sent without a token says so: the fix is a token, not a different one."""
        assert self._target is not None
        try:
            yield
        except UpstreamAuthError as e:
            if self._target.token is None:
                raise MissingTokenError("the upstream refused a request sent without a token") from e
            raise


def _token_file() -> str | None:
    """The token in the file `HF_TOKEN_FILE` names, if set; a set but unreadable or empty file is an error."""
    path = os.environ.get("HF_TOKEN_FILE", "").strip()
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"HF_TOKEN_FILE={path!r} cannot be read") from e
    if not token:
        raise ValueError(f"HF_TOKEN_FILE={path!r} is empty")
    return token
