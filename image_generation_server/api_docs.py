"""
The OpenAPI schema's additions to what FastAPI derives.

The native route's image body, every error it answers with its body, and the MCP endpoint (a plain ASGI route, which
FastAPI does not list).
"""

from typing import Any

from image_generation_server.generation import PIPELINE_NAME
from image_generation_server.mcp import MCP_PATH, TOOL

DETAIL = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
BINARY = {"schema": {"type": "string", "format": "binary"}}

NATIVE_RESPONSES: dict[str, dict[str, Any]] = {
    "200": {
        "description": "The image itself, in the asked `output_format`.",
        "content": {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY},
        "headers": {
            "X-Seed": {
                "description": "The seed used; send it back to reproduce the image.",
                "schema": {"type": "integer"},
            },
            "ETag": {"description": "Send it as `If-None-Match` to get a 304.", "schema": {"type": "string"}},
            "Content-Disposition": {
                "description": 'inline; filename="image-<seed>.<ext>"',
                "schema": {"type": "string"},
            },
        },
    },
    "304": {"description": "`If-None-Match` names this image's ETag: the client has it already."},
    "401": {
        "description": "No valid `Authorization: Bearer <key>` (when `IMAGE_GENERATION_API_KEYS` is set).",
        "content": {"application/json": {"schema": DETAIL}},
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "413": {"description": "The body is over 64 KB.", "content": {"application/json": {"schema": DETAIL}}},
    "422": {
        "description": (
            "Invalid input, nothing sent upstream: field errors in FastAPI's list form, a parameter out of range as a "
            "string; or the upstream refused the parameters."
        ),
        "content": {
            "application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/HTTPValidationError"}, DETAIL]}}
        },
    },
    "429": {
        "description": "The upstream (or this server's per-key quota) is rate limiting.",
        "content": {"application/json": {"schema": DETAIL}},
        "headers": RETRY_AFTER,
    },
    "502": {
        "description": "The upstream failed, rejected our credentials, or sent something that is not the image.",
        "content": {"application/json": {"schema": DETAIL}},
    },
    "503": {
        "description": "The model is loading past the deadline, or the server's queue is full.",
        "content": {"application/json": {"schema": DETAIL}},
        "headers": RETRY_AFTER,
    },
    "504": {
        "description": "The upstream, or the local model, ran past the deadline.",
        "content": {"application/json": {"schema": DETAIL}},
    },
}

MCP_OPERATION: dict[str, Any] = {
    "tags": ["MCP"],
    "summary": f"MCP endpoint (streamable HTTP) with the tool `{TOOL}`",
    "description": (
        "Model Context Protocol over streamable HTTP, stateless; JSON replies, except for a call that sends a "
        "`progressToken`: a server-sent event stream on the POST (a progress notification per denoising step, then "
        "the JSON-RPC response). Point an MCP client at this URL; "
        f"`tools/list` offers `{TOOL}`, whose result holds each image as MCP `ImageContent` (base64 and `mimeType`) "
        "and a text line with seed, size and model. Send `Authorization: Bearer <key>` when API keys are set."
    ),
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"type": "object", "description": "A JSON-RPC 2.0 message."}}},
    },
    "responses": {
        "200": {
            "description": "The JSON-RPC response; with a `progressToken`, after the progress notifications, as "
            "server-sent events.",
            "content": {"application/json": {"schema": {}}, "text/event-stream": {"schema": {}}},
        },
        "202": {"description": "A notification or response was accepted."},
        "401": NATIVE_RESPONSES["401"],
        "406": {"description": "`Accept` must list application/json and text/event-stream."},
        "413": NATIVE_RESPONSES["413"],
        "421": {"description": "The `Host` is not one this server answers to (DNS-rebinding protection)."},
    },
}


def document(schema: dict[str, Any]) -> None:
    """Complete `schema` in place: the native route's responses, and the MCP endpoint."""
    native = schema.get("paths", {}).get(f"/{PIPELINE_NAME}/run", {}).get("post")
    if native is not None:
        native["responses"] = NATIVE_RESPONSES
    schema.setdefault("paths", {})[MCP_PATH] = {"post": MCP_OPERATION}
