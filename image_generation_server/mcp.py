"""
MCP at `/mcp`: the tool `generate_image`, which answers with the images themselves (MCP `ImageContent`).

The official `mcp` SDK's streamable HTTP transport, stateless (any replica answers any call; no sticky sessions),
runs inside the server's app: its session manager runs in the app's lifespan, the tool runs the one image pipeline
through `generation`, its errors carry the same messages as HTTP, and `HTTPGuard` asks for the same API keys. Each
reply is a short server-sent event stream on the POST itself, so that a call whose client sent a `progressToken` gets
a progress notification per denoising step (local backend) before its result. Hayhooks' own MCP tool for the wrapper
is turned off (`skip_mcp`): it could only return text.
"""

import logging
import os
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from hayhooks import log
from haystack.dataclasses import ImageContent
from mcp import types
from mcp.server.fastmcp.server import StreamableHTTPASGIApp
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import ValidationError
from starlette.routing import Route

from components.request import BatchParameters
from image_generation_server.generation import generate, generate_watched
from image_generation_server.responses import classify, validation_message
from image_generation_server.routes import MAX_BODY_BYTES

MCP_PATH = "/mcp"
TOOL = "generate_image"
ALLOWED_HOSTS_ENV = "IMAGE_GENERATION_ALLOWED_HOSTS"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

DESCRIPTION = """\
Generate images from a text prompt and get them back as images.

Write the prompt as a description of the picture: subject, setting, style, lighting. Each image is followed by a
text line with its seed, size and model; call again with that seed (and the same other arguments) to get exactly the
same image, or change the prompt and keep the seed for a variation. `n` images come with seeds seed, seed+1, ...
Sizes are multiples of 8 from 64 to 2048; larger images take longer. What is left out (size, format, steps, model)
takes the server's defaults. On failure the result is an error whose text says what to change (a parameter out of
range) or when to retry (the server or model is busy)."""


class GenerateImageArguments(BatchParameters):
    """The tool's arguments: the native route's parameters plus `n`, with the same limits."""


def create_mcp_server(app: FastAPI) -> Server:
    """The MCP server with the one tool, running the image pipeline that `app` serves."""
    server: Server = Server("image-generation", instructions="Use the generate_image tool to draw images.")
    tool = types.Tool(
        name=TOOL,
        title="Generate image",
        description=DESCRIPTION,
        inputSchema=GenerateImageArguments.model_json_schema(),
        annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=True),
    )

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return [tool]

    @server.call_tool(validate_input=False)  # validated below, with messages that never echo the input
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        if name != TOOL:
            return _error(f"unknown tool {name[:64]!r}; the tool is {TOOL}")
        try:
            request = GenerateImageArguments.model_validate(arguments)
        except ValidationError as e:
            return _error(validation_message(e.errors())[1])
        try:
            images = await _generated(app, server.request_context, request)
        except Exception as e:
            return _error(classify(e).message)
        content: list[types.ContentBlock] = [
            types.ImageContent(type="image", data=image.base64_image, mimeType=image.mime_type) for image in images
        ]
        meta = images[0].meta
        seeds = ", ".join(str(image.meta["seed"]) for image in images)
        summary = f"seed {seeds}; size {meta['width']}x{meta['height']}; model {meta['model']}"
        content.append(types.TextContent(type="text", text=summary))
        return types.CallToolResult(content=content, isError=False)

    return server


def install(app: FastAPI) -> None:
    """Serve MCP at `/mcp`, its session manager running for as long as the app's lifespan."""
    logging.getLogger().addFilter(short_validation_warnings)
    sessions = StreamableHTTPSessionManager(
        app=create_mcp_server(app),
        json_response=False,  # server-sent events on the POST: progress notifications, then the result
        stateless=True,
        security_settings=transport_security(),
        max_request_body_size=MAX_BODY_BYTES,
    )
    app.router.routes.append(Route(MCP_PATH, endpoint=StreamableHTTPASGIApp(sessions), include_in_schema=False))
    serve = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(served: Any) -> AsyncIterator[Any]:
        async with sessions.run(), serve(served) as state:
            yield state

    app.router.lifespan_context = lifespan


def transport_security() -> TransportSecuritySettings:
    """
    The SDK's DNS-rebinding check: the `Host` names in `IMAGE_GENERATION_ALLOWED_HOSTS`, else the loopback names.

    A wildcard in that list (`*`, `*.example.com`) turns the SDK's own check off: the server's Host check applies.
    """
    names = [name.strip().lower() for name in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if name.strip()]
    if any("*" in name for name in names):
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = [f"[{name}]" if ":" in name else name for name in names] or list(LOOPBACK_HOSTS)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*hosts, *(f"{host}:*" for host in hosts)],
        allowed_origins=[
            f"{scheme}://{host}{port}" for scheme in ("http", "https") for host in hosts for port in ("", ":*")
        ],
    )


def short_validation_warnings(record: logging.LogRecord) -> bool:
    """
    Root-logger filter: the SDK's warning for a malformed message becomes one short line in our log.

    The SDK logs each message it cannot validate with `logging.warning`, outside the server's log format: pydantic's
    report against every request type, about 6 KB, with pieces of the input (the prompt) in it. The client already
    gets a JSON-RPC error; the log says only that a malformed message was refused.
    """
    message = record.msg if isinstance(record.msg, str) else ""
    if record.name == "root" and message.startswith(("Failed to validate request", "Failed to validate notification")):
        log.info("MCP: refused a malformed {}", message.split(":", 1)[0].rsplit(" ", 1)[-1])
        return False
    return True


async def _generated(app: FastAPI, context: Any, request: GenerateImageArguments) -> list[ImageContent]:
    """The images; with the call's `progressToken`, a progress notification per denoising step on the way."""
    token = context.meta.progressToken if context.meta is not None else None
    if token is None:
        return await generate(app, **request.model_dump())
    images: list[ImageContent] = []
    done = 0
    async with aclosing(generate_watched(app, frozenset({"step"}), **request.model_dump())) as watched:
        async for item in watched:
            if isinstance(item, list):
                images = item
                continue
            done += 1  # a batch's images are made one after another: n times the steps in all
            await context.session.send_progress_notification(
                token, done, item["steps"] * request.n, f"step {item['step']} of {item['steps']}",
                related_request_id=context.request_id,
            )  # fmt: skip
    return images


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)
