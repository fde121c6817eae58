"""
MCP at `/mcp`: the tools `generate_image` and `edit_image`, which answer with the images themselves (`ImageContent`).

The official `mcp` SDK's streamable HTTP transport, stateless (any replica answers any call; no sticky sessions), runs
inside the server's app: its session manager runs in the app's lifespan, the tool runs the one image pipeline through
`generation`, its errors carry the same messages as HTTP, and `HTTPGuard` applies the same API keys, `Host` allow-list
and origin check as on every route (`access`). A call whose client sent a `progressToken` is answered with a short
server-sent event stream on the POST itself: a progress notification per denoising step (local backend), then its
result. Any other call is answered in plain JSON: current clients refuse a server-sent event over 1 MiB (the `mcp` SDK
2.x by default), and two 512x512 PNGs are more. Hayhooks' own MCP tool for the wrapper is turned off (`skip_mcp`): it
could only return text.
"""

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from hayhooks import log
from haystack.dataclasses import ImageContent
from mcp import types
from mcp.server.fastmcp.server import StreamableHTTPASGIApp
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field, ValidationError
from starlette.routing import Route

from components.request import Batch, BatchParameters, EditParameters
from image_generation_server import answers
from image_generation_server.generation import (
    EDIT_PIPELINE_NAME,
    Generate,
    edit,
    edit_size,
    generate,
    generate_watched,
    image_size,
    served_pipeline,
)
from image_generation_server.responses import classify, validation_message
from image_generation_server.settings import Settings
from image_generation_server.uploads import image_argument

MCP_PATH = "/mcp"
TOOL = "generate_image"
EDIT_TOOL = "edit_image"
IMAGES_PATH = "/images/"
# The SDK's own DNS-rebinding check is off: it would be a second Host and Origin allow-list, and it disagreed with the
# server's (the bind address passed one and was refused by the other). `HTTPGuard` checks both before the SDK runs.
TRANSPORT_SECURITY = TransportSecuritySettings(enable_dns_rebinding_protection=False)

DESCRIPTION = """\
Generate images from a text prompt and get them back as images.

Write the prompt as a description of the picture: subject, setting, style, lighting. Each image is followed by a
text line with its seed, size and model; call again with that seed (and the same other arguments) to get exactly the
same image, or change the prompt and keep the seed for a variation. `n` images come with seeds seed, seed+1, ...
Sizes are multiples of 8 from 64 to 2048; larger images take longer. What is left out (size, format, steps, model)
takes the server's defaults. On failure the result is an error whose text says what to change (a parameter out of
range) or when to retry (the server or model is busy)."""


EDIT_DESCRIPTION = """\
Edit an image with a text prompt and get the edited images back.

`image` is the picture to edit: a PNG, JPEG or WebP as base64, or the URL of an image this server made (a
generate_image or edit_image result stored at /images/...; no other URL is fetched). `mask` (same forms, the image's
size) marks with its fully transparent pixels what to change; every other pixel of the answer is the image's own.
Without a mask the whole image is edited. `strength` (0 to 1, default 0.8) says how far from the image to go. Each
image is followed by a text line with its seed; the same seed and arguments give the same edit."""


class GenerateImageArguments(BatchParameters):
    """The tool's arguments: the native route's parameters plus `n`, with the same limits."""


class EditImageArguments(Batch, EditParameters):
    """The edit tool's arguments: an edit's parameters plus `n`, and the image and mask as base64 or a stored URL."""

    image: str = Field(description="The image: base64 (PNG, JPEG or WebP), or the URL of an image this server made.")
    mask: str | None = Field(
        None, description="Optional: base64 or this server's image URL, the image's size, transparent where to edit."
    )


def create_mcp_server(app: FastAPI) -> Server:
    """The MCP server with the one tool, running the image pipeline that `app` serves."""
    server: Server = Server("image-generation", instructions="Use the generate_image tool to draw images.")
    tools = [
        types.Tool(
            name=TOOL,
            title="Generate image",
            description=DESCRIPTION,
            inputSchema=GenerateImageArguments.model_json_schema(),
            annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=True),
        ),
        types.Tool(
            name=EDIT_TOOL,
            title="Edit image",
            description=EDIT_DESCRIPTION,
            inputSchema=EditImageArguments.model_json_schema(),
            annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=True),
        ),
    ]

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return tools

    @server.call_tool(validate_input=False)  # validated below, with messages that never echo the input
    async def call_tool(name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        if name not in (TOOL, EDIT_TOOL):
            return _error(f"unknown tool {name[:64]!r}; the tools are {TOOL} and {EDIT_TOOL}")
        try:
            model = GenerateImageArguments if name == TOOL else EditImageArguments
            request = model.model_validate(arguments)
        except ValidationError as e:
            return _error(validation_message(e.errors())[1])
        try:
            run: Generate
            if isinstance(request, EditImageArguments):
                run, inputs = edit, _edit_inputs(app, server.request_context, request)
                size = await edit_size(served_pipeline(app, EDIT_PIPELINE_NAME), **inputs)
            else:
                run, inputs = generate, request.model_dump()
                size = image_size(served_pipeline(app), request.width, request.height)
            # The images' base64, then the SDK's JSON of the result: its text and its bytes, three copies in all.
            share = answers.reserve(request.n, *size, copies=3)
            images = await _made(app, server.request_context, run, inputs)
        except Exception as e:
            return _error(classify(e).message)
        share.hold(images)
        content: list[types.ContentBlock] = [
            types.ImageContent(type="image", data=image.base64_image, mimeType=image.mime_type) for image in images
        ]
        meta = images[0].meta
        seeds = ", ".join(str(image.meta["seed"]) for image in images)
        summary = f"seed {seeds}; size {meta['width']}x{meta['height']}; model {meta['model']}"
        content.append(types.TextContent(type="text", text=summary))
        return types.CallToolResult(content=content, isError=False)

    return server


def install(app: FastAPI, settings: Settings) -> Callable[[], AbstractAsyncContextManager[None]]:
    """Serve MCP at `/mcp`; returns its session managers' context, to run for as long as the app's lifespan."""
    logging.getLogger().addFilter(short_validation_warnings)
    server = create_mcp_server(app)
    plain, streamed = (
        StreamableHTTPSessionManager(
            app=server,
            json_response=json_response,
            stateless=True,
            security_settings=TRANSPORT_SECURITY,
            max_request_body_size=settings.max_upload_bytes,  # an edit's image comes as base64
        )
        for json_response in (True, False)
    )
    endpoint = _ByProgressToken(StreamableHTTPASGIApp(plain), StreamableHTTPASGIApp(streamed))
    app.router.routes.append(Route(MCP_PATH, endpoint=endpoint, include_in_schema=False))

    @asynccontextmanager
    async def running() -> AsyncIterator[None]:
        """The session managers, for as long as the app runs (`app.create_app` enters it in the app's one lifespan)."""
        async with plain.run(), streamed.run():
            yield

    return running


class _ByProgressToken:
    """`/mcp`: a POST whose JSON-RPC message asks for progress goes to `streamed`, any other one to `plain`."""

    def __init__(self, plain: Any, streamed: Any) -> None:
        self.plain = plain
        self.streamed = streamed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("method") != "POST":
            await self.plain(scope, receive, send)
            return
        body, more = b"", True
        while more:  # HTTPGuard has capped it at the route's limit
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await (self.streamed if _asks_for_progress(body) else self.plain)(scope, replay, send)


def _asks_for_progress(body: bytes) -> bool:
    try:
        messages = json.loads(body)
    except ValueError:
        return False
    for message in messages if isinstance(messages, list) else [messages]:
        params = message.get("params") if isinstance(message, dict) else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and meta.get("progressToken") is not None:
            return True
    return False


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


async def _made(app: FastAPI, context: Any, run: Generate, inputs: dict[str, Any]) -> list[ImageContent]:
    """
    The images of `run` (`generate` or `edit`) on `inputs`.

    With the call's `progressToken`, a progress notification per denoising step on the way.
    """
    token = context.meta.progressToken if context.meta is not None else None
    if token is None:
        return await run(app, **inputs)
    images: list[ImageContent] = []
    done = 0
    async with aclosing(generate_watched(app, frozenset({"step"}), 0, run, **inputs)) as watched:
        async for item in watched:
            if isinstance(item, list):
                images = item
                continue
            done += 1  # a batch's images are made one after another: n times the steps in all
            await context.session.send_progress_notification(
                token, done, item["steps"] * inputs["n"], f"step {item['step']} of {item['steps']}",
                related_request_id=context.request_id,
            )  # fmt: skip
    return images


def _edit_inputs(app: FastAPI, context: Any, request: EditImageArguments) -> dict[str, Any]:
    """The editor's run inputs for the request: its image and mask (base64, or images of this server's store) read."""
    host = context.request.headers.get("host", "") if context.request is not None else ""
    store = app.state.image_store
    image = image_argument(store, request.image, "image", host)
    mask = image_argument(store, request.mask, "mask", host) if request.mask is not None else None
    return {"image": image, "mask": mask, **request.model_dump(exclude={"image", "mask"})}


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)
