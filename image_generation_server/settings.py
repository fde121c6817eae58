"""
The service's settings: every `IMAGE_GENERATION_*` variable, read once at startup, validated, and passed down.

`load_settings()` reads the environment (an empty variable means the default) and fails with a `SettingsError` that
names the variable. The app factory (`image_generation_server.app.create_app`) loads them once, hands them to each
door and the guard, and makes them the process's settings (`use`), which the pipeline wrappers and jobs take
(`current_settings`: Hayhooks gives a wrapper's `setup()` no argument); no other module reads our variables.
Settings that change what a component does are applied to the served pipeline's component init parameters
(`component_overrides`), so that the pipeline that runs is the YAML plus what the operator set. Hayhooks' own
`HAYHOOKS_*` settings and the Hugging Face token (`HF_API_TOKEN`, `HF_TOKEN`, `HF_TOKEN_FILE`) are not ours: Hayhooks
and the component's `Secret` read them.
`docs/configuration.md` shows these fields as a table (`scripts/configuration_table.py` writes it).
"""

import ipaddress
import math
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from components.urls import parse_http_url

ENV_PREFIX = "IMAGE_GENERATION_"
HF_ROUTER_URL = "https://router.huggingface.co"
RATE_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# A comma-separated list in the environment (`a,b`), not JSON.
CommaList = Annotated[tuple[str, ...], NoDecode]
Networks = Annotated[tuple[Network, ...], NoDecode]


class SettingsError(ValueError):
    """A setting is invalid; the message names its variable (and never repeats a secret's value)."""


def http_url(value: str) -> str:
    """`value` if it is an absolute http(s) URL with a host, without a trailing slash; else `ValueError`."""
    parse_http_url(value)
    return value.rstrip("/")


class Settings(BaseSettings):
    """Every `IMAGE_GENERATION_*` setting. A field's variable is the prefix plus its name in capitals."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore", frozen=True, validate_default=True
    )

    # The pipeline
    backend: Literal["huggingface_api", "local"] = Field(
        "huggingface_api", description="The pipeline served: `huggingface_api` (HF Inference) or `local` (diffusers)."
    )
    local_model: str | None = Field(
        None,
        description="`local` backend: the diffusers model, a Hub id or a folder (default: the pipeline's, "
        "stabilityai/sd-turbo).",
    )
    endpoint: str | None = Field(
        None,
        description="An HF-protocol text-to-image server URL (a dedicated Inference Endpoint, a self-hosted one): "
        'every request is POSTed there as `{"inputs": prompt, "parameters": {...}}`; it serves one model, so a '
        "request's `model` must be omitted or one of `IMAGE_GENERATION_MODELS`, else the pipeline's model (default: "
        "Hugging Face Inference Providers).",
    )
    router_url: str = Field(
        HF_ROUTER_URL,
        description="Base URL of the Inference Providers router: a proxy in front of it, or a test double.",
    )
    models: CommaList | None = Field(
        None,
        description="Comma-separated Hub model ids a request may ask for (default: any Hub model id; with "
        "`IMAGE_GENERATION_ENDPOINT`, only the pipeline's model).",
    )
    timeout: float = Field(
        120.0, description='Deadline for one image in seconds, retries of "model loading" 503s included.'
    )
    max_image_bytes: int = Field(
        32 * 1024 * 1024,
        description="Largest upstream reply accepted, in bytes (read as a stream, cut at the cap; a 2048² PNG is "
        "about 12 MB).",
    )
    max_inflight_bytes: int = Field(
        512 * 1024 * 1024,
        description="Bytes of upstream replies all requests may hold at once while reading them; beyond, 503 with "
        "`Retry-After`. This, not concurrency times the per-image cap, bounds memory.",
    )
    max_answer_bytes: int = Field(
        512 * 1024 * 1024,
        description="Bytes all requests' answers may hold at once: the images a door made and what it builds from "
        "them (base64, JSON, MCP results), from before the work until the answer is sent. A request is counted at its "
        "worst (width x height x 4 bytes per image and copy) until its images are made; beyond, 503 with "
        "`Retry-After` before any work. See [Performance](performance.md#memory-the-worst-case).",
    )
    max_request_pixels: int = Field(
        10 * 2048 * 2048,
        description="Largest `n` x width x height one request may ask for, at every door that answers images and in "
        "jobs, edit jobs included (an edit's size is its image's own unless it asks for another); more is a 400/422 "
        "that says so. The default allows `n: 10` at 2048x2048.",
    )
    send_timeout: float = Field(
        30.0,
        description="Seconds a client may leave an answer unread (the connection's send buffer full) before the "
        "connection is closed and its request ends, memory given back.",
    )
    result_url_allow: Networks = Field(
        (),
        description="Comma-separated networks (`10.1.0.0/16`) a provider's result URL may point into although "
        "private or loopback (default: none).",
    )
    # Serving: admission, the seeded-result cache
    max_concurrency: int = Field(64, description="Upstream calls (or local generations) at once per replica.")
    max_queue: int = Field(256, description="Requests that may wait for a slot per replica; more are answered 503.")
    cache_bytes: int = Field(
        256 * 1024 * 1024, description="Byte budget of the in-process seeded-result cache; 0 disables it."
    )
    cache_redis_url: str | None = Field(
        None,
        description="Redis sharing seeded results between replicas (default: the jobs' Redis when Hayhooks' durable "
        "store is Redis, else none).",
    )
    # HTTP
    api_keys: CommaList = Field(
        (), repr=False, description="Comma-separated API keys accepted as `Authorization: Bearer <key>` on every "
        "route the inventory marks `api_key`: the run routes (the JSON variant included), jobs, `/v1/*` and `/mcp` "
        "(default: none, auth off)."
    )  # fmt: skip
    max_upload_bytes: int = Field(
        20 * 1024 * 1024,
        description="Largest request body that carries an image to edit (`/v1/images/edits`, `/image_editing/run`, "
        "the MCP `edit_image` tool), in bytes; 413 beyond. Other requests are capped at 64 KB.",
    )
    head_timeout: float = Field(
        10.0,
        description="Seconds a client has to send a request's line and headers once it has begun them (or its first "
        "request, once connected); 408 and the connection closed after (closed without an answer if it sent nothing).",
    )
    body_timeout: float = Field(20.0, description="Seconds a client has to send a whole request body; 408 after.")
    rate_limit: str | None = Field(
        None,
        description="Requests per window for each API key (or client address with keys off), e.g. `60/minute`; "
        "counted in `HAYHOOKS_DURABLE_REDIS_URL`'s Redis when that is set (default: no quota).",
    )
    trusted_proxies: Networks = Field(
        (),
        description="Comma-separated addresses or networks (`10.0.0.0/8`) of the reverse proxies whose "
        "`X-Forwarded-For` and `X-Forwarded-Proto` are believed (default: none, forwarded headers are ignored; see "
        "[Security](security.md#behind-a-reverse-proxy-the-client-address)).",
    )
    rate_limit_unit: Literal["requests", "images"] = Field(
        "requests",
        description="What `IMAGE_GENERATION_RATE_LIMIT` counts: `requests`, or `images` (a request for `n: 10` "
        "takes ten); the limit headers are then `x-ratelimit-*-images`.",
    )
    allowed_hosts: CommaList = Field(
        (),
        description="Comma-separated `Host` names the server answers to (`*.example.com` matches subdomains, `*` "
        "anything; see [Security](security.md)) (default: the loopback names and the bind address).",
    )
    ui: bool = Field(True, description="The web page at `/`; `false` turns it off (the API and `/docs` stay).")
    metrics_key: str | None = Field(
        None, repr=False, description="Serve `GET /metrics` to scrapers sending this key as a Bearer token "
        "(default: metrics off)."
    )  # fmt: skip
    # Jobs: each client's share (a client is an API key, or an address with keys off)
    max_jobs_per_client: int = Field(
        10,
        description="Unfinished (queued or running) jobs one client may have at once; beyond, 429. All clients "
        "together are bounded by `HAYHOOKS_DURABLE_MAX_NONTERMINAL_EXECUTIONS` (100), which this must stay below.",
    )
    max_streams_per_client: int = Field(
        4,
        description="Job progress streams one client may hold open at once on a replica; beyond, 429. All clients "
        "together are bounded by `HAYHOOKS_DURABLE_REDIS_MAX_VIEWERS` (100 per replica, with the Redis job store).",
    )
    max_finished_jobs_per_client: int = Field(
        100,
        description="Finished jobs kept per client: when it submits another, the oldest beyond this are deleted "
        "(their status is then a 404). Each is kept no longer than its images (`IMAGE_GENERATION_IMAGE_MAX_AGE`).",
    )
    # Jobs' images
    image_dir: Path | None = Field(
        None,
        description="The image store: where job (and OpenAI `url`) images are kept. It must be the server user's own "
        "folder, a real one (not a link), that group and others cannot write into; the server refuses to start "
        "otherwise (see [Security](security.md)). Default: the user's cache folder (`~/.cache/image-generation/images` "
        "without `XDG_CACHE_HOME`), made `0700`; a volume in compose.",
    )
    image_bytes: int = Field(
        1024**3,
        description="Byte budget of the image store, held when an image is written: the oldest images are deleted "
        "first to make room; an image larger than the whole budget is a 503.",
    )
    image_max_age: float = Field(24 * 3600.0, description="Seconds an image is kept in the image store.")
    # What goes into every image
    embed_parameters: bool = Field(
        False,
        description="Embed the prompt and parameters in every image: PNG `parameters` chunk, XMP prompt, C2PA action "
        "parameters ([why off](provenance.md)).",
    )
    c2pa_cert: Path | None = Field(
        None,
        description="Path of the PEM certificate chain that signs C2PA Content Credentials; needs the `c2pa` extra "
        "(default: no signing).",
    )
    c2pa_key: Path | None = Field(
        None, repr=False, description="C2PA signing: the PEM private key's file path (a Docker secret), never the key."
    )
    c2pa_tsa_url: str | None = Field(None, description="C2PA signing: an RFC 3161 timestamp authority URL.")

    @field_validator("models", "api_keys", "allowed_hosts", "result_url_allow", "trusted_proxies", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.lower() for name in value)

    @field_validator("models")
    @classmethod
    def _no_empty_list(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return value or None

    @field_validator("endpoint", "router_url", "c2pa_tsa_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("timeout", "head_timeout", "body_timeout", "image_max_age", "send_timeout")
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if not 0 < value < math.inf:
            raise ValueError("must be a positive number of seconds")
        return value

    @field_validator(
        "max_image_bytes", "max_inflight_bytes", "max_concurrency", "image_bytes", "max_jobs_per_client",
        "max_streams_per_client", "max_upload_bytes", "max_answer_bytes", "max_request_pixels",
    )  # fmt: skip
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("max_queue", "cache_bytes")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            rate_limit(value)
        return value

    @field_validator("c2pa_key", mode="before")
    @classmethod
    def _key_path(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().startswith("-----"):
            raise ValueError("must be the path of a key file (or a Docker secret), not a key")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_inflight_bytes < self.max_image_bytes:
            raise ValueError(f"{ENV_PREFIX}MAX_INFLIGHT_BYTES must be at least {ENV_PREFIX}MAX_IMAGE_BYTES")
        if (self.c2pa_cert is None) != (self.c2pa_key is None):
            raise ValueError(f"{ENV_PREFIX}C2PA_CERT and {ENV_PREFIX}C2PA_KEY must be set together")
        return self

    @property
    def quota(self) -> tuple[int, int] | None:
        """The rate limit as (requests, period in seconds), or None without one."""
        return None if self.rate_limit is None else rate_limit(self.rate_limit)


SECRET_FIELDS = frozenset(name for name, field in Settings.model_fields.items() if field.repr is False)


def rate_limit(raw: str) -> tuple[int, int]:
    """`<count>/<second|minute|hour|day>` (`60/minute`) as (requests, period in seconds)."""
    count, _, unit = raw.strip().partition("/")
    if not count.strip().isdigit() or int(count) < 1 or unit.strip().lower() not in RATE_PERIODS:
        raise ValueError("must look like 60/minute (second, minute, hour or day)")
    return int(count), RATE_PERIODS[unit.strip().lower()]


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return ENV_PREFIX + field.upper()


def load_settings(**values: Any) -> Settings:
    """
    The settings from the environment (`values`, by field name, win over it).

    :raises SettingsError: Naming each invalid variable, with its value unless it is a secret.
    """
    try:
        return Settings(**values)
    except ValidationError as e:
        problems = []
        for error in e.errors(include_url=False):
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            if not field:
                problems.append(message)
            elif field in SECRET_FIELDS:
                problems.append(f"{env_name(field)}: {message}")
            else:
                problems.append(f"{env_name(field)}={error['input']!r}: {message}")
        raise SettingsError("; ".join(problems)) from None


_current: Settings | None = None
_current_lock = threading.Lock()


def use(config: Settings) -> None:
    """Make `config` the process's settings: what `current_settings()` answers (the app factory's object)."""
    global _current  # noqa: PLW0603 - one settings object per process, shared with the wrappers Hayhooks deploys
    with _current_lock:
        _current = config


def current_settings() -> Settings:
    """
    The process's settings: those given to `use()`, else read from the environment once and kept.

    The environment is read only in a process that our app factory did not start (`hayhooks run` serving the
    wrapper folders).

    :raises SettingsError: Reading the environment, naming each invalid variable.
    """
    global _current  # noqa: PLW0603 - see `use`
    with _current_lock:
        if _current is None:
            _current = load_settings()
        return _current
