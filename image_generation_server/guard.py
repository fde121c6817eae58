"""ASGI middleware in front of every route: the route inventory's policy, applied before the route runs."""

import asyncio
import json
import math
from typing import Any

from fastapi import FastAPI
from hayhooks import log
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_generation_server.access import ApiKeys, HostAllowList, OriginPolicy
from image_generation_server.answers import AnswerBudget, paced, share_of
from image_generation_server.quota import IDENTITY_SCOPE_KEY, Quota, identity, images_asked, limited_send
from image_generation_server.responses import clip, error_response
from image_generation_server.result_cache import CACHE_SCOPE
from image_generation_server.routes import Inventory, Route

MAX_READ_BYTES = 1024 * 1024  # what a refused body is read (and dropped) up to, so that its client reads the answer
MAX_ECHOED_NAME_CHARS = 64
RATE_LIMIT_SPENT = "the rate limit is spent, retry later"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class HTTPGuard:
    """
    Applies each route's row of the inventory (`image_generation_server/routes.py`) before the route runs.

    In order, each refusal costing nothing: 400 for a `Host` the server does not answer to (DNS rebinding), 404/405
    for a route no row lists, 403 for a state-changing request from another browser origin (CSRF), 412 for
    `If-None-Match: *` on a POST, 401 without a valid Bearer key where the row asks for one, 413 for a body over the
    row's cap (declared, or counted while reading: no more is ever held), 408 for a body that takes longer than the
    body timeout, 422 for JSON that is nested too deeply, holds a non-finite number, or names a field the route does
    not take. While a route with a body runs, a client that disconnects cancels it, and with it the upstream call or
    the local generation. With API keys on, the request's cache scope is its key's hash, so that callers with
    different keys never share cached or coalesced results. With a quota (`IMAGE_GENERATION_RATE_LIMIT`), each keyed
    route that takes a body takes one request from the caller's quota (or, counting images, its `n` once the body is
    read: `image_generation_server.quota.images_asked`; 429 past it), and every answer carries the
    limit headers. A request with a body holds a share of the answers' byte budget (`image_generation_server.answers`)
    until its answer is sent, which goes out a chunk at a time. A `HEAD` on a GET route is answered by the route as a
    GET, with its status and headers only.
    """

    def __init__(  # noqa: PLR0913
        self,
        app: ASGIApp,
        api: FastAPI,
        inventory: Inventory,
        api_keys: ApiKeys,
        hosts: HostAllowList,
        origins: OriginPolicy,
        body_timeout: float,
        quota: Quota | None = None,
        *,
        answers: AnswerBudget,
    ) -> None:
        self.app = app
        self.api = api
        self.inventory = inventory
        self.api_keys = api_keys
        self.hosts = hosts
        self.origins = origins
        self.body_timeout = body_timeout
        self.quota = quota
        self.answers = answers
        self._fields: dict[str, frozenset[str]] = {}
        self._schema: dict | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse what the route's row does not allow, then run the route until it answers or its client leaves."""
        if scope["type"] == "websocket":  # no row serves a websocket
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        row = self.inventory.match(scope["method"], scope["path"].removeprefix(scope.get("root_path", "")))
        keyed = isinstance(row, Route) and row.auth == "api_key" and bool(self.api_keys)
        # The key's id, hashed once: its cache scope, its quota, and (`request.state.key_id`) the owner of its jobs.
        owner = self.api_keys.owner(headers.get("authorization", "")) if keyed else None
        refusal = self._refusal_unread(scope, headers, row, owner)
        # Whose quota, and share of jobs and streams (image_generation_server.job_shares).
        scope[IDENTITY_SCOPE_KEY] = identity(owner, scope.get("client"))
        metered = isinstance(row, Route) and self.quota is not None and _metered(row, owner, self.api_keys)
        if refusal is None and metered and self.quota is not None and self.quota.unit == "requests":
            send, retry_after = await limited_send(self.quota, scope[IDENTITY_SCOPE_KEY], send)
            if retry_after is not None:
                retry = {"Retry-After": str(retry_after)}
                refusal = error_response(row.errors, 429, RATE_LIMIT_SPENT, retry)
        if refusal is None and isinstance(row, Route):
            if owner is not None:
                CACHE_SCOPE.set(owner)
                scope.setdefault("state", {})["key_id"] = owner
            if scope["method"] == "HEAD":  # a GET row's route, answered without its body
                await self.app({**scope, "method": "GET"}, receive, _headers_only(send))
            elif row.body is None:
                await self.app(scope, receive, send)
            else:
                await self._run_with_body(scope, receive, send, headers, row, metered=metered)
            return
        # Unless the client waits for a 100 Continue, let it finish sending (up to MAX_READ_BYTES): a client that is
        # still sending when the connection closes gets a reset instead of the answer.
        if _declared_length(headers) and "100-continue" not in headers.get("expect", "").lower():
            try:
                async with asyncio.timeout(self.body_timeout):
                    if await _read_body(receive, keep=0) is None:
                        return
            except TimeoutError:
                pass
        await refusal(scope, receive, send)

    def _refusal_unread(
        self, scope: Scope, headers: Headers, row: Route | int | None, owner: str | None
    ) -> Response | None:
        """The answer decided from the request line and headers alone, or None to go on."""
        host = headers.get("host", "")
        method = scope["method"]
        extra = None
        if not self.hosts.allows(host):
            status, message = 400, "the Host header names a host this server does not answer to"
        elif not isinstance(row, Route):
            status, message = (405, "Method Not Allowed") if row == 405 else (404, "Not Found")
        elif method not in SAFE_METHODS and not self.origins.allows(headers.get("origin"), host):
            status, message = 403, "requests from another origin are refused"
        elif method == "POST" and "*" in (tag.strip() for tag in headers.get("if-none-match", "").split(",")):
            status, message = 412, "If-None-Match: * never matches a request that creates an image"
        elif row.auth == "api_key" and self.api_keys and owner is None:
            status, message, extra = 401, "a valid API key is required", {"WWW-Authenticate": "Bearer"}
        elif _declared_length(headers) > (cap := row.body.max_bytes if row.body is not None else 0):
            status, message = 413, f"the request body is over {cap} bytes"
        else:
            return None
        return error_response(row.errors if isinstance(row, Route) else "native", status, message, extra)

    async def _run_with_body(  # noqa: PLR0913
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, row: Route, *, metered: bool
    ) -> None:
        assert row.body is not None
        try:
            async with asyncio.timeout(self.body_timeout):
                read = await _read_body(receive, keep=row.body.max_bytes)
        except TimeoutError:
            log.info("Request body not received in {} s: refused {} {}", self.body_timeout, scope["method"], row.path)
            refusal = error_response(row.errors, 408, "the request body took too long", {"Connection": "close"})
            await refusal(scope, receive, send)
            return
        if read is None:  # the client left while sending
            return
        body, size = read
        refusal = None
        if size > row.body.max_bytes:
            refusal = error_response(row.errors, 413, f"the request body is over {row.body.max_bytes} bytes")
        elif not _is_multipart(headers) and (
            errors := _json_errors(body, self._json_fields(row) if row.body.closed else None)
        ):
            refusal = error_response(row.errors, 422, errors)
        elif metered and self.quota is not None and self.quota.unit == "images":  # a request takes its images
            cost = images_asked(body, _is_multipart(headers))
            send, retry_after = await limited_send(self.quota, scope[IDENTITY_SCOPE_KEY], send, cost)
            if retry_after is not None:
                refusal = error_response(row.errors, 429, RATE_LIMIT_SPENT, {"Retry-After": str(retry_after)})
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        async with share_of(self.answers):  # given back once the answer is sent, or the client is gone
            await _run_until_disconnect(self.app, scope, body, receive, paced(send))

    def _json_fields(self, row: Route) -> frozenset[str] | None:
        """The body fields the route takes, from its OpenAPI schema; None when its body is not a JSON object."""
        schema = self.api.openapi()  # cached by FastAPI; rebuilt after a deploy or undeploy
        if schema is not self._schema:
            self._schema = schema
            self._fields = {
                f"{method} {path}": frozenset(model.get("properties", {}))
                for (method, path), model in json_bodies(schema).items()
            }
        return self._fields.get(f"{row.method.lower()} {row.path}")


def _headers_only(send: Send) -> Send:
    """`send` for a `HEAD` answered by a GET route: the status and headers (`Content-Length` included), no body."""

    async def send_headers(message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return send_headers


def _metered(row: Route, owner: str | None, api_keys: ApiKeys) -> bool:
    """Whether a request takes from a quota: the keyed routes that do work (take a body), by key or client address."""
    return row.auth == "api_key" and row.body is not None and (owner is not None or not api_keys)


def json_bodies(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The JSON-object request body schemas in an OpenAPI schema, by (lower-case method, path)."""
    bodies = {}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}) if isinstance(operation, dict) else {}
            model = body.get("content", {}).get("application/json", {}).get("schema", {})
            if ref := model.get("$ref"):
                model = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
            if model.get("type") == "object":
                bodies[(method, path)] = model
    return bodies


def _declared_length(headers: Headers) -> int:
    """The body length the headers declare; a chunked body counts as one byte or more."""
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() else (1 if "transfer-encoding" in headers else 0)


async def _read_body(receive: Receive, keep: int) -> tuple[bytes, int] | None:
    """
    Read the body, up to `keep` bytes and one chunk more (at least `MAX_READ_BYTES`), keeping its first `keep` bytes.

    Returns the bytes kept and the number read (more than `keep` means the body was cut), or None when the client
    disconnects.
    """
    chunks, size = [], 0
    while size <= max(MAX_READ_BYTES, keep):
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


def _is_multipart(headers: Headers) -> bool:
    """Whether the body is a multipart form (an upload), which the route's form parser reads, not JSON."""
    return headers.get("content-type", "").lower().startswith("multipart/")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number too large for a double")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_errors(body: bytes, fields: frozenset[str] | None) -> list[dict[str, Any]]:
    """
    FastAPI-shaped errors for JSON that breaks the rules FastAPI does not enforce; other malformed bodies are its own.

    Refused: JSON nested too deeply, a non-finite number (`NaN`, `Infinity`, `1e309`), a number over 4300 digits,
    bytes that are not text, and, when `fields` is given, a field not in it.
    """
    try:
        value = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError:
        return []
    except (RecursionError, ValueError):  # nested too deeply, not finite, over 4300 digits, bytes that are not text
        message = "JSON body is too deep, holds a number that is not finite or too long, or is not text"
        return [{"type": "json_invalid", "loc": ["body"], "msg": message}]
    if fields is None or not isinstance(value, dict):
        return []
    unknown = sorted(name for name in value if name not in fields)[:10]
    return [
        {
            "type": "extra_forbidden",
            "loc": ["body", clip(name, MAX_ECHOED_NAME_CHARS)],
            "msg": "Extra inputs are not permitted",
        }
        for name in unknown
    ]


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
