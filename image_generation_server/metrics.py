"""
`GET /metrics`: Prometheus metrics of the service, served only when `IMAGE_GENERATION_METRICS_KEY` is set.

The scrape presents that key as a Bearer token; it is not an API key, so a scraper cannot generate images and an API
client cannot read traffic figures. Without the key there is no `/metrics` route and nothing is counted.

HTTP requests are counted here, by route template (never the raw path), door and status. Generations are counted
from the progress bus (`image_generation_server.progress`): the serving layer reports there, the generators through
the callback it passes them, and neither knows of this module.
Label values are bounded: model ids only from the served set (else `other`), sizes in five buckets, upstream
statuses from a fixed list (else their class, such as `5xx`).

With several processes (`uvicorn --workers N`), set `PROMETHEUS_MULTIPROC_DIR` to an empty directory before they
start: each process writes its values there and every scrape adds them up (prometheus_client's multiprocess mode).
"""

import hmac
import os
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from image_generation_server import progress
from image_generation_server.routes import Inventory, Route
from image_generation_server.settings import Settings

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
SIZE_BUCKETS = (256, 512, 768, 1024, 2048)  # an image counts in the first square bucket with as many pixels
UPSTREAM_STATUSES = frozenset((200, 400, 401, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504))
DISCONNECTED = "499"  # the client left before an answer (nginx's code for it)
# Route template prefix -> door; then jobs (durable runs, their executions) and the pipelines' own run routes.
DOOR_PREFIXES = (("/v1/", "openai"), ("/mcp", "mcp"), ("/images/", "job"))

REQUESTS = Counter(
    "image_generation_http_requests",
    "HTTP requests answered, by route template, door and status",
    ("route", "door", "status"),
)
REQUEST_SECONDS = Histogram("image_generation_http_request_duration_seconds", "Time to answer, by door", ("door",))
QUEUE_WAIT_SECONDS = Histogram("image_generation_queue_wait_seconds", "Time a generation waited for a slot")
GENERATION_SECONDS = Histogram(
    "image_generation_generation_seconds",
    "Time in the upstream call (retries included) or the local generation, per image",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, float("inf")),
)
POSTPROCESS_SECONDS = Histogram(
    "image_generation_postprocess_seconds",
    "Time to check, convert, tag and encode one image",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, float("inf")),
)
UPSTREAM_CALLS = Counter("image_generation_upstream_requests", "HTTP calls to the upstream, by status", ("status",))
UPSTREAM_SECONDS = Histogram(
    "image_generation_upstream_request_duration_seconds", "Duration of one upstream HTTP call, by status", ("status",)
)
IN_FLIGHT = Gauge("image_generation_in_flight", "Generations holding a slot", multiprocess_mode="livesum")
QUEUE_DEPTH = Gauge("image_generation_queue_depth", "Generations waiting for a slot", multiprocess_mode="livesum")
CACHE_LOOKUPS = Counter("image_generation_cache_lookups", "Seeded-result cache lookups, by result", ("result",))
CACHE_BYTES = Gauge(
    "image_generation_cache_bytes", "Bytes held by the seeded-result cache", multiprocess_mode="livesum"
)
COALESCED = Counter("image_generation_coalesced_requests", "Requests that shared an identical request's generation")
IMAGES = Counter(
    "image_generation_images", "Images generated, by model, size bucket and format", ("model", "size", "format")
)
DENOISING_STEPS = Counter("image_generation_denoising_steps", "Denoising steps run by the local backend")
DENOISING_SECONDS = Counter("image_generation_denoising_seconds", "Time spent denoising by the local backend")
DEVICE_MEMORY = Gauge(
    "image_generation_device_memory_bytes",
    "CUDA memory allocated after the last generation",
    multiprocess_mode="livemax",
)
DEVICE_MEMORY_PEAK = Gauge(
    "image_generation_device_memory_peak_bytes", "Peak CUDA memory allocated", multiprocess_mode="livemax"
)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve `GET /metrics` and count requests and generations, when `IMAGE_GENERATION_METRICS_KEY` is set."""
    key = settings.metrics_key
    if not key:
        return
    app.add_middleware(
        RequestMetrics, inventory=app.state.inventory
    )  # outermost: it sees every answer, the guard's refusals included
    app.add_route("/metrics", _scrape_endpoint(key.encode()), methods=["GET"], include_in_schema=False)
    progress.observe(_count_event)


def _scrape_endpoint(key: bytes) -> Callable[[Request], Any]:
    async def scrape(request: Request) -> Response:
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), key):
            return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if os.environ.get(MULTIPROCESS_DIR_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return scrape


class RequestMetrics:
    """Counts every HTTP request by route template, door and status, and times it by door."""

    def __init__(self, app: ASGIApp, inventory: Inventory) -> None:
        self.app = app
        self.inventory = inventory

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, then count it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = DISCONNECTED

        async def tracked_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            status = "500"
            raise
        finally:
            route = route_template(self.inventory, scope)
            door = door_of(route)
            REQUESTS.labels(route, door, status).inc()
            REQUEST_SECONDS.labels(door).observe(time.perf_counter() - started)


def route_template(inventory: Inventory, scope: Scope) -> str:
    """The path template of the inventory row (`routes.py`) for this request, `unmatched` when none lists it."""
    row = inventory.match(scope["method"], scope["path"].removeprefix(scope.get("root_path", "")))
    return row.path if isinstance(row, Route) else "unmatched"


def door_of(route: str) -> str:
    """Which door a route template belongs to: native, openai, mcp, job, or other (status, docs, metrics...)."""
    for prefix, door in DOOR_PREFIXES:
        if route.startswith(prefix):
            return door
    if route.endswith("/run-durable") or "/executions" in route:
        return "job"
    return "native" if route.endswith("/run") else "other"


def size_bucket(width: int, height: int) -> str:
    """The smallest square bucket with at least as many pixels, such as `512x512`."""
    side = next((side for side in SIZE_BUCKETS if width * height <= side * side), SIZE_BUCKETS[-1])
    return f"{side}x{side}"


def upstream_status(status: int | str) -> str:
    """A listed status code as is, another one as its class (`5xx`), `timeout` and `error` as they are."""
    if isinstance(status, str):
        return status
    return str(status) if status in UPSTREAM_STATUSES else f"{status // 100}xx"


def _admitted(event: dict[str, Any]) -> None:
    QUEUE_DEPTH.dec()
    IN_FLIGHT.inc()
    QUEUE_WAIT_SECONDS.observe(event["waited"])


def _released(event: dict[str, Any]) -> None:
    (IN_FLIGHT if event["admitted"] else QUEUE_DEPTH).dec()


def _upstream(event: dict[str, Any]) -> None:
    status = upstream_status(event["status"])
    UPSTREAM_CALLS.labels(status).inc()
    UPSTREAM_SECONDS.labels(status).observe(event["seconds"])


def _cache(event: dict[str, Any]) -> None:
    if "hit" in event:
        CACHE_LOOKUPS.labels("hit" if event["hit"] else "miss").inc()
    CACHE_BYTES.set(event["bytes"])


def _finished(event: dict[str, Any]) -> None:
    IMAGES.labels(event["model"], size_bucket(event["width"], event["height"]), event["format"]).inc()
    POSTPROCESS_SECONDS.observe(event["seconds"])


def _denoised(event: dict[str, Any]) -> None:
    DENOISING_STEPS.inc(event["steps"])
    DENOISING_SECONDS.inc(event["seconds"])


def _device_memory(event: dict[str, Any]) -> None:
    DEVICE_MEMORY.set(event["device_memory_bytes"])
    DEVICE_MEMORY_PEAK.set(event["device_memory_peak_bytes"])


# Progress phase -> what it counts; phases not listed (such as `step`) count nothing.
_COUNTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "queued": lambda _: QUEUE_DEPTH.inc(),
    "sent": _admitted,
    "generating": _admitted,
    "received": lambda event: GENERATION_SECONDS.observe(event["seconds"]),
    "released": _released,
    "upstream": _upstream,
    "cache": _cache,
    "coalesced": lambda _: COALESCED.inc(),
    "finished": _finished,
    "denoised": _denoised,
    "device_memory": _device_memory,
}


def _count_event(event: dict[str, Any]) -> None:
    count = _COUNTERS.get(event["phase"])
    if count is not None:
        count(event)
