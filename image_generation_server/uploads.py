"""
Edits arrive as multipart forms: their files become the editing component's inputs, their text fields a request model.

A form's values are all text: `form_model` reads each field's value as its type ("64" as 64), with the same limits.
"""

from typing import Annotated, TypeVar, get_type_hints

import pybase64
from haystack.dataclasses import ImageContent
from pydantic import BaseModel, Field, create_model

from components.image_input import image_format

M = TypeVar("M", bound=BaseModel)


def image_content(data: bytes) -> ImageContent:
    """An upload as an `ImageContent`; its MIME type is what its bytes are (the component checks them before use)."""
    fmt = image_format(data)
    return ImageContent(
        base64_image=pybase64.b64encode_as_string(data),
        mime_type=f"image/{fmt}" if fmt else None,
        validation=False,
    )


def form_model(model: type[M]) -> type[M]:
    """`model` with each field read from text (its type, limits and description kept), for a multipart form."""
    hints = get_type_hints(model, include_extras=True)
    properties = model.model_json_schema()["properties"]
    fields = {
        name: (Annotated[hints[name], Field(strict=False)], field)
        for name, field in model.model_fields.items()
        if _types(properties[name]) & {"integer", "number", "boolean"}
    }
    return create_model(f"{model.__name__}Form", __base__=model, **fields)  # type: ignore[call-overload]


def _types(schema: dict) -> set[str]:
    """The JSON types a property's schema allows."""
    return {schema["type"]} if "type" in schema else {t for option in schema.get("anyOf", []) for t in _types(option)}
