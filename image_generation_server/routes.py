"""
The route inventory: every (method, path) the server answers, and the policy `HTTPGuard` applies to each.

Hayhooks' app adds more routes than this service serves (runtime deployment, chat, files, drawing, traces).
`prune()` removes every route and mount that no row lists, and `HTTPGuard` answers 404 or 405 for any request no
row matches, so a route that Hayhooks (or anything else) adds later is never reachable. A door adds its rows here.
"""

from dataclasses import dataclass, replace
from typing import Literal

from fastapi import FastAPI
from starlette.routing import BaseRoute, Mount, compile_path

from image_generation_server.private_fastapi import drop_routes, included_routes
from image_generation_server.settings import Settings

# Who may call a route: with a valid API key when keys are configured, anyone, whoever holds the URL, or whoever
# holds a key of the route's own that the route checks (the metrics scrape key).
Auth = Literal["api_key", "public", "capability", "own_key"]
# How a refusal's body is shaped: FastAPI's `{"detail": ...}`, or OpenAI's `{"error": {...}}` (the `/v1/*` doors).
ErrorShape = Literal["native", "openai"]


@dataclass(frozen=True)
class Body:
    """
    A request body a route takes.

    :param max_bytes: Largest body accepted (413 beyond); no more than this is ever held in memory.
    :param closed: Refuse JSON object fields that the route's OpenAPI request schema does not declare (422).
    :param upload: The body carries an image: its cap is the upload cap (`IMAGE_GENERATION_MAX_UPLOAD_BYTES`), which
        the inventory sets in place of `max_bytes`.
    """

    max_bytes: int
    closed: bool = True
    upload: bool = False


@dataclass(frozen=True)
class Route:
    """
    One (method, path) the server answers, and its policy.

    :param method: HTTP method; a GET row also answers HEAD.
    :param path: Starlette path template, as the route declares it (`/images/{name}`); a mount's row ends in
        `{path:path}`.
    :param auth: `api_key`, `public`, `capability` (the unguessable URL is the credential) or `own_key` (the route
        checks a key of its own).
    :param body: The body it takes; None means a request with a body is refused (413).
    :param errors: The shape of its error bodies.
    :param durable: True for a route served only in Hayhooks' durable mode, False only outside it, None in both.
    :param optional: Served only when a setting turns it on (or does not turn it off).
    """

    method: str
    path: str
    auth: Auth
    body: Body | None = None
    errors: ErrorShape = "native"
    durable: bool | None = None
    optional: bool = False


MAX_BODY_BYTES = 64 * 1024
RUN_BODY = Body(MAX_BODY_BYTES)
DEFAULT_MAX_UPLOAD_BYTES: int = Settings.model_fields["max_upload_bytes"].default
UPLOAD_BODY = Body(DEFAULT_MAX_UPLOAD_BYTES, closed=False, upload=True)  # multipart, or an open JSON-RPC body

ROUTES: tuple[Route, ...] = (
    Route("GET", "/status", "public"),
    Route("GET", "/ready", "public"),  # image_generation_server/readiness.py
    Route("GET", "/openapi.json", "public"),
    # Swagger UI with its assets served from here (image_generation_server/page.py)
    Route("GET", "/docs", "public"),
    Route("GET", "/docs/swagger-ui-bundle.js", "public"),
    Route("GET", "/docs/swagger-ui.css", "public"),
    Route("GET", "/docs/favicon.png", "public"),
    # the pipelines' run routes: the wrapper, and the JSON variant (served/image_generation_json.yml)
    Route("POST", "/image_generation/run", "api_key", RUN_BODY),
    Route("POST", "/image_generation_json/run", "api_key", RUN_BODY),
    # the editing pipeline's (pipelines/image_editing/): multipart uploads, and its JSON variant (base64 images)
    Route("POST", "/image_editing/run", "api_key", UPLOAD_BODY),
    Route("POST", "/image_editing_json/run", "api_key", replace(UPLOAD_BODY, closed=True)),
    # jobs (jobs.py): Hayhooks' durable routes of the image pipeline; with API keys on, a job is its key's own.
    # `resume` stays because Hayhooks links to it in every job; an image job never waits for input (409).
    Route("POST", "/image_generation/run-durable", "api_key", RUN_BODY, durable=True),
    Route("GET", "/image_generation/executions", "api_key", durable=True),
    Route("GET", "/image_generation/executions/{execution_id}", "api_key", durable=True),
    Route("GET", "/image_generation/executions/{execution_id}/stream", "api_key", durable=True),
    Route("POST", "/image_generation/executions/{execution_id}/cancel", "api_key", durable=True),
    Route(
        "POST", "/image_generation/executions/{execution_id}/resume", "api_key", Body(1024, closed=False), durable=True
    ),
    # edit jobs (the editing wrapper's durable routes): the image comes as base64 or as a stored image's path
    Route("POST", "/image_editing/run-durable", "api_key", replace(UPLOAD_BODY, closed=True), durable=True),
    Route("GET", "/image_editing/executions", "api_key", durable=True),
    Route("GET", "/image_editing/executions/{execution_id}", "api_key", durable=True),
    Route("GET", "/image_editing/executions/{execution_id}/stream", "api_key", durable=True),
    Route("POST", "/image_editing/executions/{execution_id}/cancel", "api_key", durable=True),
    Route("POST", "/image_editing/executions/{execution_id}/resume", "api_key", Body(1024, closed=False), durable=True),
    # stored images (image_store.py): the unguessable name is the credential, so that an <img> can load it and
    # whoever has it (the page, once the browser holds the image) can delete it
    Route("GET", "/images/{name}", "capability"),
    Route("DELETE", "/images/{name}", "capability"),
    # the OpenAI-compatible door (openai_images.py); its model list replaces Hayhooks' (chat models). With `stream`,
    # generations answer OpenAI's server-sent events: bounded by the generation (≤ 3 partial images, then the image)
    Route("POST", "/v1/images/generations", "api_key", RUN_BODY, errors="openai"),
    Route("POST", "/v1/images/edits", "api_key", UPLOAD_BODY, errors="openai"),
    Route("GET", "/v1/models", "api_key", errors="openai"),
    # the MCP door (image_generation_server/mcp.py): stateless JSON-RPC over POST, answered in JSON, or with a
    # `progressToken` as server-sent events (progress notifications, then the result); its SDK checks the body's shape
    Route("POST", "/mcp", "api_key", UPLOAD_BODY),  # the edit_image tool takes images as base64
    # the web page (image_generation_server/page.py), unless IMAGE_GENERATION_UI=false
    Route("GET", "/", "public", optional=True),
    Route("GET", "/static/{name}", "public", optional=True),
    # Prometheus metrics (image_generation_server/metrics.py), only when IMAGE_GENERATION_METRICS_KEY is set
    Route("GET", "/metrics", "own_key", optional=True),
)


class Inventory:
    """The rows that apply in one mode, matched against requests and against the app's routes."""

    def __init__(
        self, routes: tuple[Route, ...] = ROUTES, *, durable: bool = False, max_upload_bytes: int | None = None
    ) -> None:
        """
        The rows that apply in one mode.

        :param durable: Whether Hayhooks runs in durable mode (rows for the other mode are left out).
        :param max_upload_bytes: The upload cap, for the rows whose body is an upload; None keeps their default.
        """
        self.routes = tuple(
            _with_upload_cap(route, max_upload_bytes) for route in routes if route.durable in (None, durable)
        )
        self._patterns = [(route, compile_path(route.path)[0]) for route in self.routes]

    def match(self, method: str, path: str) -> Route | Literal[405] | None:
        """The row for this request; 405 when rows list the path under other methods only; None when none list it."""
        listed = False
        for route, pattern in self._patterns:
            if pattern.fullmatch(path):
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    return route
                listed = True
        return 405 if listed else None

    def lists(self, route: BaseRoute, path: str) -> bool:
        """Whether a row names this route (one of its methods at `path`, its full path), or a path under this mount."""
        if isinstance(route, Mount):
            return any(row.path.startswith(path.rstrip("/") + "/") for row in self.routes)
        methods = getattr(route, "methods", None)  # None: an ASGI app that takes any method (the guard picks)
        return any(row.path == path and (methods is None or row.method in methods) for row in self.routes)


def _with_upload_cap(route: Route, max_upload_bytes: int | None) -> Route:
    if route.body is None or not route.body.upload or max_upload_bytes is None:
        return route
    return replace(route, body=replace(route.body, max_bytes=max_upload_bytes))


def prune(app: FastAPI, inventory: Inventory) -> None:
    """
    Remove from `app` every route and mount that `inventory` does not list, and invalidate its OpenAPI schema.

    A route that an earlier one shadows (the same path and method) goes too: FastAPI adds its doc routes again at
    each deploy, and a door replaces one of Hayhooks' routes by adding its own ahead of it.
    """
    seen: dict[str, set[str]] = {}  # the methods served by path

    def keep(route: BaseRoute, path: str) -> bool:
        if not inventory.lists(route, path):
            return False
        methods = set(getattr(route, "methods", None) or {"*"}) - {"HEAD"}
        if isinstance(route, Mount) or not methods & seen.get(path, set()):
            seen.setdefault(path, set()).update(methods)
            return True
        return False

    drop_routes(app, keep)
    app.openapi_schema = None


def listed_routes(app: FastAPI) -> set[tuple[str, str]]:
    """
    Every (method, path) the app's router answers, HEAD left out.

    A route that takes any method is `("*", path)`, and a mount `("*", "<path>/{path:path}")`.
    """
    found = set()
    for route, path in included_routes(app):
        methods = getattr(route, "methods", None)
        if isinstance(route, Mount):
            found.add(("*", f"{path.rstrip('/')}/{{path:path}}"))
        elif methods is None:
            found.add(("*", path))
        else:
            found |= {(method, path) for method in methods if method != "HEAD"}
    return found
