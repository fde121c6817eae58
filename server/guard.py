"""ASGI middleware in front of the JSON run routes: API keys, body cap, strict fields, cancel on disconnect."""

import asyncio
import hmac
import json
import os
from typing import Any

from fastapi import FastAPI
from hayhooks import log
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.quota import Quota, limited_send
from server.responses import openai_error

API_KEYS_ENV = "IMAGE_GENERATION_API_KEYS"
OPENAI_PREFIX = "/v1/"  # the OpenAI-compatible doors: refusals in OpenAI's error envelope
KEYED_PATHS = ("/mcp",)  # routes without an OpenAPI body that still need the API key (their own code caps bodies)
MAX_BODY_BYTES = 64 * 1024
MAX_READ_BYTES = 1024 * 1024  # what a refused body is read (and dropped) up to, so that its client reads the answer
TOO_LARGE = f"the request body is over {MAX_BODY_BYTES} bytes"
MAX_ECHOED_NAME_CHARS = 64


def api_keys_from_env() -> tuple[bytes, ...]:
    """The accepted API keys from `IMAGE_GENERATION_API_KEYS` (comma-separated); none means auth is off."""
    return tuple(key.strip().encode() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip())


class HTTPGuard:
    """
    Guards the JSON run routes: every `POST /{name}/run` (and `/run-durable`) and `POST /v1/...` that takes an object.

    Refusals on `/v1/...` (the OpenAI-compatible doors) come in OpenAI's error envelope.

    Before the route runs: 401 without a valid Bearer key (when keys are configured), 413 for a body over 64 KB
    (declared, or counted while reading: no more than 64 KB is ever held), 422 for JSON nested too deeply or naming a
    field the route does not take. While it runs: when the client disconnects, the route is cancelled, and with it the
    upstream call or the local generation. `/mcp` gets the API key and declared-length checks only. Other requests
    pass through untouched.
    """

    def __init__(self, app: ASGIApp, api: FastAPI, api_keys: tuple[bytes, ...], quota: Quota | None = None) -> None:
        self.app = app
        self.api = api
        self.api_keys = api_keys
        self.quota = quota
        self._fields: dict[str, frozenset[str]] = {}
        self._schema: dict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check a request to a guarded route, then run it until it answers or its client leaves."""
        if scope["type"] == "http" and scope["path"] in KEYED_PATHS:
            headers = Headers(scope=scope)
            refusal = self._refusal_unread(headers, matching_key(headers.get("authorization", ""), self.api_keys))
            await (self.app if refusal is None else refusal)(scope, receive, send)
            return
        fields = self._json_fields(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        if fields is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = matching_key(headers.get("authorization", ""), self.api_keys)
        refusal = self._refusal_unread(headers, key)
        if self.quota is not None and (key is not None or not self.api_keys):
            send, retry_after = await limited_send(self.quota, key, scope.get("client"), send)
            if retry_after is not None and refusal is None:
                refusal = _refusal(429, "the rate limit is spent, retry later", {"Retry-After": str(retry_after)})
        if refusal is not None:
            # Unless the client waits for a 100 Continue, let it finish sending (up to MAX_READ_BYTES): a client that
            # is still sending when the connection closes gets a reset instead of the answer.
            if "100-continue" not in headers.get("expect", "").lower() and await _read_body(receive, keep=0) is None:
                return
        else:
            read = await _read_body(receive, keep=MAX_BODY_BYTES)
            if read is None:  # the client left while sending
                return
            body, size = read
            if size > MAX_BODY_BYTES:
                refusal = _refusal(413, TOO_LARGE)
            elif errors := _json_errors(body, fields):
                refusal = _refusal(422, errors)
            else:
                await _run_until_disconnect(self.app, scope, body, receive, send)
                return
        if scope["path"].startswith(OPENAI_PREFIX):
            refusal = _openai_refusal(refusal)
        await refusal(scope, receive, send)

    def _refusal_unread(self, headers: Headers, key: bytes | None) -> JSONResponse | None:
        """401 without a valid key (when keys are configured), 413 for a declared length over the cap."""
        if self.api_keys and key is None:
            return _refusal(401, "a valid API key is required", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _refusal(413, TOO_LARGE)
        return None

    def _json_fields(self, scope: Scope) -> frozenset[str] | None:
        """The body fields the run route at this path takes, or None when it takes no JSON object."""
        schema = self.api.openapi()  # cached by FastAPI; rebuilt after a deploy or undeploy
        if schema is not self._schema:
            self._schema = schema
            self._fields = {path: frozenset(model.get("properties", {})) for path, model in run_bodies(schema).items()}
        return self._fields.get(scope["path"].removeprefix(scope.get("root_path", "")))


def matching_key(authorization: str, api_keys: tuple[bytes, ...]) -> bytes | None:
    """The API key an `Authorization: Bearer <key>` header carries, if it is one of `api_keys`; else None."""
    scheme, _, supplied = authorization.partition(" ")
    supplied_bytes = supplied.strip().encode()
    # Compare against every key so that the time taken does not depend on which one matched.
    matched = [key for key in api_keys if hmac.compare_digest(supplied_bytes, key)]
    return matched[0] if matched and scheme.lower() == "bearer" else None


def run_bodies(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The JSON-object body schemas of the guarded routes (`POST /{name}/run`, `/run-durable`, `/v1/...`), by path."""
    bodies = {}
    for path, operations in schema.get("paths", {}).items():
        guarded = path.endswith(("/run", "/run-durable")) or path.startswith(OPENAI_PREFIX)
        body = operations.get("post", {}).get("requestBody", {}) if guarded else {}
        model = body.get("content", {}).get("application/json", {}).get("schema", {})
        if ref := model.get("$ref"):
            model = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
        if model.get("type") == "object":
            bodies[path] = model
    return bodies


async def _read_body(receive: Receive, keep: int) -> tuple[bytes, int] | None:
    """
    Read the body, up to `MAX_READ_BYTES`, keeping its first `keep` bytes.

    Returns the bytes kept and the number read (more than `keep` means the body was cut), or None when the client
    disconnects.
    """
    chunks, size = [], 0
    while size <= MAX_READ_BYTES:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if size + len(chunk) <= keep:
            chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), size


def _json_errors(body: bytes, fields: frozenset[str]) -> list[dict[str, Any]]:
    """FastAPI-shaped errors for JSON too deep or with unknown fields; other malformed bodies are left to FastAPI."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return []
    except (RecursionError, ValueError):  # nested too deeply, a number over 4300 digits, bytes that are not text
        return [
            {"type": "json_invalid", "loc": ["body"], "msg": "JSON body is too deep, too long a number, or not text"}
        ]
    if not isinstance(value, dict):
        return []
    unknown = sorted(name for name in value if name not in fields)[:10]
    return [
        {
            "type": "extra_forbidden",
            "loc": ["body", name[:MAX_ECHOED_NAME_CHARS]],
            "msg": "Extra inputs are not permitted",
        }
        for name in unknown
    ]


def _refusal(status: int, detail: object, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status, headers)


def _openai_refusal(refusal: JSONResponse) -> JSONResponse:
    """A refusal in OpenAI's envelope (its 400 for our 422), naming the first unknown field."""
    detail = json.loads(refusal.body)["detail"]
    param = detail[0]["loc"][-1] if isinstance(detail, list) and detail[0]["type"] == "extra_forbidden" else None
    if isinstance(detail, list):
        detail = f"unknown field {param!r}" if param is not None else detail[0]["msg"]
    headers = {name: value for name, value in refusal.headers.items() if name in ("www-authenticate",)}
    return openai_error(refusal.status_code, detail, param=param, headers=headers)


async def _run_until_disconnect(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the route on the buffered body; cancel it if the client disconnects before the response is sent."""
    disconnected = asyncio.Event()
    replayed = False
    responded = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def tracked_send(message: Message) -> None:
        nonlocal responded
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            responded = True
        await send(message)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    route = asyncio.ensure_future(app(scope, replay, tracked_send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait((route, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not route.done() and not responded:
            route.cancel()
            log.info("Client disconnected: cancelled {} {}", scope["method"], scope["path"])
        await asyncio.wait((route,))
    finally:
        route.cancel()
        watcher.cancel()
    if not route.cancelled():
        route.result()  # re-raise what the route raised
