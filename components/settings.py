"""
Limits shared by every backend: the component's init parameters, else a default.

A component reads no settings from the environment. The server's settings (`IMAGE_GENERATION_*`, read once by
`image_generation_server.settings`) reach it as init parameters, applied to the pipeline YAML when the server loads it
(`image_generation_server.generation.component_overrides`).
"""

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


def value_or(value: T | None, default: T) -> T:
    """`value` unless it is `None` (never `value or default`: that would drop a 0)."""
    return default if value is None else value


def generator_settings(
    *, allowed_models: list[str] | None, timeout: float | None, max_image_bytes: int | None
) -> GeneratorSettings:
    """The limits of a component: its init parameters, the defaults above where they are `None`."""
    settings = GeneratorSettings(
        allowed_models=frozenset(allowed_models) if allowed_models else None,
        timeout=value_or(timeout, DEFAULT_TIMEOUT),
        max_image_bytes=value_or(max_image_bytes, DEFAULT_MAX_IMAGE_BYTES),
    )
    if settings.timeout <= 0 or settings.max_image_bytes <= 0:
        raise ValueError("timeout and max_image_bytes must be positive")
    return settings
