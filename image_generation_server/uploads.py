"""
Edits arrive as multipart forms: their files become the editing component's inputs, their text fields a request model.

A form's values are all text: `form_model` reads each field's value as its type ("64" as 64), with the same limits.
"""

from typing import Annotated, TypeVar, get_type_hints
from urllib.parse import urlsplit

import pybase64
from haystack.dataclasses import ImageContent
from pydantic import BaseModel, Field, create_model

from components.errors import InvalidRequestError
from components.image_input import image_format
from components.urls import is_http_url
from image_generation_server.image_store import NAME, ImageStore

IMAGES_PATH = "/images/"

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


def image_argument(store: ImageStore | None, value: str, name: str, host: str | None = None) -> ImageContent:
    """
    An image given as text (a tool's or a job's argument): base64, or a URL of this server's image store.

    A URL is only a name in the store, read from there: nothing is ever fetched. It is the store's path
    (`/images/<name>`), or, when `host` (the request's `Host`) is given, an absolute URL on that host.

    :raises InvalidRequestError: Any other URL, an image the store does not hold, or text that is not base64.
    """
    if is_http_url(value) or value.startswith(IMAGES_PATH):
        parts = urlsplit(value)
        stored = parts.path.removeprefix(IMAGES_PATH)
        foreign = bool(parts.netloc) and (host is None or parts.netloc != host)
        if foreign or not parts.path.startswith(IMAGES_PATH) or not NAME.fullmatch(stored) or store is None:
            raise InvalidRequestError(f"{name}: a URL must be one of this server's images (/images/...)")
        data = store.read(stored)
        if data is None:
            raise InvalidRequestError(f"{name}: no such image in this server's store (they expire)")
        return image_content(data)
    try:
        return image_content(pybase64.b64decode(value, validate=True))
    except ValueError as e:
        raise InvalidRequestError(f"{name} must be base64, or the URL of one of this server's images") from e
