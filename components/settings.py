"""
Serving settings shared by every backend: a value set on the component wins, else the environment, else a default.

Resolved in `warm_up()`, on the machine that serves, so that one serialized pipeline runs anywhere.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_MAX_QUEUE = 256
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ServingSettings:
    """Limits and reuse policy of one component instance."""

    allowed_models: frozenset[str] | None
    timeout: float
    max_image_bytes: int
    max_concurrency: int
    max_queue: int
    cache_max_bytes: int


def resolve(value: T | None, env_var: str, default: T, parse: Callable[[str], T]) -> T:
    """`value` if set, else the parsed environment variable if set and non-empty, else `default`."""
    if value is not None:
        return value
    raw = os.environ.get(env_var, "").strip()
    if not raw:
        return default
    try:
        return parse(raw)
    except ValueError as e:
        raise ValueError(f"{env_var}={raw!r} is not valid") from e


def parse_models(raw: str) -> frozenset[str]:
    """A comma-separated list of model ids."""
    return frozenset(item.strip() for item in raw.split(",") if item.strip())


def serving_settings(  # noqa: PLR0913
    *,
    allowed_models: list[str] | None,
    timeout: float | None,
    max_image_bytes: int | None,
    max_concurrency: int | None,
    max_queue: int | None,
    cache_max_bytes: int | None,
) -> ServingSettings:
    """Resolve every serving setting from the component's values and the `IMAGE_GENERATION_*` environment."""
    models = resolve(
        frozenset(allowed_models) if allowed_models is not None else None,
        "IMAGE_GENERATION_MODELS",
        None,
        parse_models,
    )
    settings = ServingSettings(
        allowed_models=models or None,
        timeout=resolve(timeout, "IMAGE_GENERATION_TIMEOUT", DEFAULT_TIMEOUT, float),
        max_image_bytes=resolve(max_image_bytes, "IMAGE_GENERATION_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, int),
        max_concurrency=resolve(max_concurrency, "IMAGE_GENERATION_MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY, int),
        max_queue=resolve(max_queue, "IMAGE_GENERATION_MAX_QUEUE", DEFAULT_MAX_QUEUE, int),
        cache_max_bytes=resolve(cache_max_bytes, "IMAGE_GENERATION_CACHE_BYTES", DEFAULT_CACHE_BYTES, int),
    )
    if settings.timeout <= 0 or settings.max_image_bytes <= 0 or settings.max_concurrency <= 0:
        raise ValueError("timeout, max_image_bytes and max_concurrency must be positive")
    if settings.max_queue < 0 or settings.cache_max_bytes < 0:
        raise ValueError("max_queue and cache_max_bytes must not be negative")
    return settings
