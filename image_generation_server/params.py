"""
The request parameters every door takes, as pydantic types carrying the limits that the OpenAPI schema publishes.

Types are strict (no string for a number, no boolean, no Infinity). String lengths and float ranges are checked by
the component (`GenerationRequest.validate`), so that every door refuses them with the component's own message.
"""

from typing import Annotated

from pydantic import Field

from components.previews import MAX_PREVIEWS
from components.request import (
    MAX_GUIDANCE,
    MAX_MODEL_ID_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    MODEL_ID_PATTERN,
    SIZE_MULTIPLE,
)

Size = Annotated[int, Field(strict=True, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE)]
Text = Annotated[str, Field(json_schema_extra={"minLength": 1, "maxLength": MAX_PROMPT_CHARS})]
ModelId = Annotated[str, Field(json_schema_extra={"maxLength": MAX_MODEL_ID_CHARS, "pattern": MODEL_ID_PATTERN})]
# Strict: a string ("7") or a boolean is a 422, not a number; Infinity and NaN are too.
Guidance = Annotated[
    float, Field(strict=True, allow_inf_nan=False, json_schema_extra={"minimum": 0, "maximum": MAX_GUIDANCE})
]
Steps = Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)]
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]
PartialImages = Annotated[int, Field(strict=True, ge=0, le=MAX_PREVIEWS)]
