"""
The request parameters every door takes, as pydantic types carrying the limits that the OpenAPI schema publishes.

Strings and floats are range-checked by the component (`GenerationRequest.validate`), not by pydantic: FastAPI's
validation errors echo the input, which is how a huge prompt, a lone surrogate or an Infinity would come back.
"""

from typing import Annotated

from pydantic import Field

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
Guidance = Annotated[float, Field(json_schema_extra={"minimum": 0, "maximum": MAX_GUIDANCE})]
Steps = Annotated[int, Field(strict=True, ge=1, le=MAX_STEPS)]
Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]
