"""
One text-to-image request: each parameter's type, limits and description, defined once, and its validation.

`GenerationParameters` is what every door takes (the native route, jobs, OpenAI's images API, the MCP tool); a
parameter left out (`None`) means the pipeline's default, which is the component's init parameter in the pipeline
YAML and nowhere else. A door takes the model whole (`Batch` adds `n`), or `CommonParameters` plus its own shape of
the rest (OpenAI's `size` for width and height). The pydantic types are strict (no string for a number, no boolean,
no Infinity) and carry the limits the OpenAPI schema publishes; string lengths and float ranges are checked by the
component (`GenerationRequest.validate`), so that every door refuses them with the component's own message.
`GenerationRequest` is a request resolved by the component: every default applied, the seed fixed.
"""

import re
import secrets
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, Annotated, Literal

from haystack.dataclasses import ImageContent
from pydantic import BaseModel, ConfigDict, Field

from components.errors import InvalidRequestError
from components.previews import MAX_PREVIEWS

if TYPE_CHECKING:
    from components.image_input import SourceImage

OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")

MAX_PROMPT_CHARS = 2000
MIN_SIZE = 64
MAX_SIZE = 2048
SIZE_MULTIPLE = 8
MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_GUIDANCE = 50.0
MAX_MODEL_ID_CHARS = 96
MAX_IMAGES = 10
DEFAULT_STRENGTH = 0.8

# A Hub model id: "name" or "namespace/name"; never a URL, a path or a traversal.
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$"
# C0/C1 control characters other than tab, newline and carriage return, and lone surrogates.
PROMPT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]*$"
# What ends a line for a reader of the `parameters` text (the others are refused in prompts): a prompt's line breaks
# would let it write lines of its own, such as `Negative prompt:` or `Steps:`.
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029]+")
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)
_PROMPT_RE = re.compile(PROMPT_PATTERN)

Text = Annotated[str, Field(json_schema_extra={"minLength": 1, "maxLength": MAX_PROMPT_CHARS})]
Size = Annotated[int, Field(strict=True, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE)]
Steps = Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)]
# Strict: a string ("7") or a boolean is a 422, not a number; Infinity and NaN are too.
Guidance = Annotated[
    float, Field(strict=True, allow_inf_nan=False, json_schema_extra={"minimum": 0, "maximum": MAX_GUIDANCE})
]
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]
ModelId = Annotated[str, Field(json_schema_extra={"maxLength": MAX_MODEL_ID_CHARS, "pattern": MODEL_ID_PATTERN})]
ImageCount = Annotated[int, Field(strict=True, ge=1, le=MAX_IMAGES)]
PartialImages = Annotated[int, Field(strict=True, ge=0, le=MAX_PREVIEWS)]
# Checked by the component (0..1), like the guidance scale's range.
Strength = Annotated[float, Field(strict=True, allow_inf_nan=False, json_schema_extra={"minimum": 0, "maximum": 1})]
DEFAULT = "the pipeline's default when omitted"


class CommonParameters(BaseModel):
    """The parameters every door takes under the same name."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(description=f"What to draw, 1 to {MAX_PROMPT_CHARS} characters.")
    negative_prompt: Text | None = Field(
        None, description=f"What to keep out of the image, up to {MAX_PROMPT_CHARS} characters."
    )
    num_inference_steps: Steps | None = Field(None, description=f"Denoising steps, 1 to {MAX_STEPS}; {DEFAULT}.")
    guidance_scale: Guidance | None = Field(None, description=f"Guidance scale, 0 to {MAX_GUIDANCE:g}; {DEFAULT}.")
    seed: Seed | None = Field(
        None, description=f"Seed, 0 to {MAX_SEED}; the server picks one when omitted (pass it back to reproduce)."
    )
    model: ModelId | None = Field(
        None, description=f"Hugging Face Hub model id (`namespace/name`), one the server serves; {DEFAULT}."
    )
    output_format: OutputFormat | None = Field(None, description=f"`png`, `jpeg` or `webp`; {DEFAULT}.")


class GenerationParameters(CommonParameters):
    """The parameters of one image, as the native route and the JSON variant take them."""

    width: Size | None = Field(
        None, description=f"Width in pixels, a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}; {DEFAULT}."
    )
    height: Size | None = Field(
        None, description=f"Height in pixels, a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}; {DEFAULT}."
    )


class EditParameters(GenerationParameters):
    """The parameters of one edit besides its image and mask: an image's, the size the image's own, and `strength`."""

    width: Size | None = Field(
        None,
        description=f"Width of the result in pixels, a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}; the "
        "image's own when omitted (the image and mask are resized to it).",
    )
    height: Size | None = Field(
        None,
        description=f"Height of the result in pixels, a multiple of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}; "
        "the image's own when omitted.",
    )
    strength: Strength | None = Field(
        None,
        description=f"How far from the image, 0 to 1; {DEFAULT_STRENGTH} when omitted. Near 0 the result stays close "
        "to the image, at 1 it keeps only its layout's noise.",
    )


MASK = (
    "A PNG or WebP of the image's size whose fully transparent pixels mark what to change; every other pixel of the "
    "answer is the image's own. Without it the whole image is edited."
)


class EditInputs(EditParameters):
    """An edit with its image and mask as Haystack `ImageContent`s (`{"base64_image": ...}`), as JSON carries them."""

    image: ImageContent = Field(description='The image to edit, a PNG, JPEG or WebP: `{"base64_image": ...}`.')
    mask: ImageContent | None = Field(None, description=f'Optional, `{{"base64_image": ...}}`. {MASK}')


class Batch(BaseModel):
    """How many images one call makes."""

    n: ImageCount = Field(
        1, description=f"How many images, 1 to {MAX_IMAGES}; image i is the image that seed `seed + i` gives alone."
    )


class Streaming(BaseModel):
    """Whether the answer is a stream of server-sent events, and how many previews it carries."""

    stream: bool | None = Field(
        None,
        description="Answer with server-sent events (`image_generation.partial_image`, then "
        "`image_generation.completed`) instead of JSON; one image (`n` 1), as base64.",
    )
    partial_images: PartialImages | None = Field(
        None,
        description=f"With `stream`: previews to send before the image, 0 to {MAX_PREVIEWS} (default 0). The local "
        "backend sends them at evenly spaced steps (fewer with very few steps); the Hugging Face API backend sends "
        "none.",
    )


class BatchParameters(Batch, GenerationParameters):
    """The parameters of `n` images: a job, the MCP tool."""


def random_seed(highest: int = MAX_SEED) -> int:
    """A fresh seed in [0, highest], so that every image can be reproduced."""
    return secrets.randbelow(highest + 1)


@dataclass(frozen=True)
class GenerationRequest:
    """The resolved parameters of one image: every default applied, the seed fixed."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int
    model: str
    output_format: str

    def validate(self, allowed_models: frozenset[str] | None = None) -> None:
        """Raise `InvalidRequestError` naming the first parameter that is out of range; send nothing anywhere."""
        for name in ("prompt", "negative_prompt"):
            _check_text(name, getattr(self, name), required=name == "prompt")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or not MIN_SIZE <= value <= MAX_SIZE or value % SIZE_MULTIPLE:
                raise InvalidRequestError(
                    f"{name}={value!r} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
                )
        if self.num_inference_steps is not None and not (
            _is_int(self.num_inference_steps) and 1 <= self.num_inference_steps <= MAX_STEPS
        ):
            raise InvalidRequestError(f"num_inference_steps={self.num_inference_steps!r} must be in 1..{MAX_STEPS}")
        if self.guidance_scale is not None and not (
            isinstance(self.guidance_scale, (int, float)) and 0 <= self.guidance_scale <= MAX_GUIDANCE  # NaN fails
        ):
            raise InvalidRequestError(f"guidance_scale must be a number in 0..{MAX_GUIDANCE}")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed={self.seed!r} must be in 0..{MAX_SEED}")
        if self.output_format not in OUTPUT_FORMATS:
            formats = ", ".join(OUTPUT_FORMATS)
            raise InvalidRequestError(f"output_format={self.output_format!r} must be one of {formats}")
        if not is_model_id(self.model):  # never echoed: it may be anything
            raise InvalidRequestError("model must be a Hugging Face Hub model id such as 'namespace/name'")
        if allowed_models is not None and self.model not in allowed_models:
            raise InvalidRequestError(f"model={self.model!r} is not served here")

    def cache_key(self) -> tuple:
        """Everything that decides the image's bytes."""
        return astuple(self)

    def parameters_text(self) -> str:
        """
        The generation parameters in AUTOMATIC1111's `parameters` text format.

        The prompts are written on one line each (their line breaks as spaces), so that no prompt adds a line.
        """
        lines = [_LINE_BREAKS.sub(" ", self.prompt)]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {_LINE_BREAKS.sub(' ', self.negative_prompt)}")
        fields = []
        if self.num_inference_steps is not None:
            fields.append(f"Steps: {self.num_inference_steps}")
        if self.guidance_scale is not None:
            fields.append(f"CFG scale: {self.guidance_scale}")
        fields += [f"Seed: {self.seed}", f"Size: {self.width}x{self.height}", f"Model: {self.model}"]
        lines.append(", ".join(fields))
        return "\n".join(lines)


@dataclass(frozen=True)
class EditRequest(GenerationRequest):
    """
    One edit of an uploaded image.

    The generation parameters, the source image (resized to `width` x `height`), the mask (255 where to edit; None
    edits the whole image), and `strength`.
    """

    strength: float = DEFAULT_STRENGTH
    image: "SourceImage | None" = None
    mask: "SourceImage | None" = None

    def validate(self, allowed_models: frozenset[str] | None = None) -> None:
        """The generation checks, then `strength` in 0..1 and an image of the request's size."""
        GenerationRequest.validate(self, allowed_models)
        if not (isinstance(self.strength, (int, float)) and not isinstance(self.strength, bool)) or not (
            0 <= self.strength <= 1  # NaN fails
        ):
            raise InvalidRequestError("strength must be a number in 0..1")
        if self.image is None:
            raise InvalidRequestError("image is required")

    def cache_key(self) -> tuple:
        """Everything that decides the image's bytes: the pixels by their digest."""
        mask = self.mask.digest if self.mask is not None else None
        assert self.image is not None
        return (*self.generation_values().values(), self.strength, self.image.digest, mask)

    def generation_values(self) -> dict[str, object]:
        """The generation parameters, without the images (for a manifest or a log)."""
        return {field.name: getattr(self, field.name) for field in fields(GenerationRequest)}

    def parameters_text(self) -> str:
        """The generation parameters in AUTOMATIC1111's format, with the denoising strength."""
        return f"{GenerationRequest.parameters_text(self)}, Denoising strength: {self.strength}"


def is_model_id(value: object) -> bool:
    """Whether `value` is shaped like a Hub model id (not a URL, path or traversal)."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_MODEL_ID_CHARS
        and _MODEL_ID_RE.fullmatch(value) is not None
        and ".." not in value
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(name: str, value: object, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidRequestError(f"{name} must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(f"{name} is {len(value)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if _PROMPT_RE.fullmatch(value) is None:
        raise InvalidRequestError(f"{name} contains control characters")
