"""
Limits shared by every backend: a value set on the component wins, else the environment, else a default.

Resolved in `warm_up()`, on the machine that serves, so that one serialized pipeline runs anywhere.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 120.0
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class GeneratorSettings:
    """Limits of one component instance."""

    allowed_models: frozenset[str] | None
    timeout: float
    max_image_bytes: int


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


def generator_settings(
    *, allowed_models: list[str] | None, timeout: float | None, max_image_bytes: int | None
) -> GeneratorSettings:
    """Resolve the limits from the component's values and the `IMAGE_GENERATION_*` environment."""
    models = resolve(
        frozenset(allowed_models) if allowed_models is not None else None,
        "IMAGE_GENERATION_MODELS",
        None,
        parse_models,
    )
    settings = GeneratorSettings(
        allowed_models=models or None,
        timeout=resolve(timeout, "IMAGE_GENERATION_TIMEOUT", DEFAULT_TIMEOUT, float),
        max_image_bytes=resolve(max_image_bytes, "IMAGE_GENERATION_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, int),
    )
    if settings.timeout <= 0 or settings.max_image_bytes <= 0:
        raise ValueError("timeout and max_image_bytes must be positive")
    return settings
