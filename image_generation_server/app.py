"""
The service: Hayhooks' app reduced to the route inventory, with `HTTPGuard` in front, served by Uvicorn.

Uvicorn runs on uvloop with httptools, under a cap on the request head (`image_generation_server.http_protocol`).
"""

import argparse
import contextlib
import functools
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from hayhooks import create_app as create_hayhooks_app
from hayhooks.settings import StartupDeployStrategy, settings
from haystack.core.serialization import allow_deserialization_module
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from image_generation_server import api_docs, image_store, jobs, mcp, metrics, openai_images, page, readiness
from image_generation_server.access import ApiKeys, HostAllowList, OriginPolicy, configure_cors, cors_enabled
from image_generation_server.allocator import tune_allocator
from image_generation_server.answers import AnswerBudget
from image_generation_server.guard import HTTPGuard, json_bodies
from image_generation_server.http_protocol import CappedHttpToolsProtocol
from image_generation_server.log import access_logged, quiet_per_run_chatter
from image_generation_server.private_hayhooks import log_through_hayhooks, set_hayhooks_settings
from image_generation_server.private_starlette import append_inner_middleware, remove_middleware, run_inside_lifespan
from image_generation_server.quota import Quota
from image_generation_server.responses import http_exception_handler, validation_error_handler
from image_generation_server.routes import Inventory, prune
from image_generation_server.settings import Settings, load_settings, use

# The doors beside the pipelines' own run routes: each module's `install(app)` adds its routes to the app, and returns
# what must run while the app runs (an async context manager factory), if anything: the app's one lifespan enters it.
DOORS: tuple = (metrics, page, image_store, jobs, openai_images, mcp, readiness)
# Seconds an idle keep-alive connection stays open.
KEEP_ALIVE_SECONDS = 5


def create_app(config: Settings | None = None) -> FastAPI:
    """
    Hayhooks' app, configured by its `HAYHOOKS_*` settings, with only the inventory's routes and `HTTPGuard` added.

    Also an app factory for `uvicorn --factory image_generation_server.app:create_app`, e.g. with `--workers`.

    :param config: Our settings; read from the environment (`load_settings()`) when not given. Passed to the guard
        and to every door, and made the process's settings (`settings.use`) for the pipeline wrappers and jobs.
    :raises SettingsError: A setting is invalid; the message names its variable.
    """
    config = config or load_settings()
    use(config)
    tune_allocator()
    jobs.configure_durable_mode(config)
    # Hayhooks prepares startup pipelines in parallel threads; two threads importing `components` modules at once can
    # deadlock on Python's import locks (seen with the wrapper and the JSON variant). Two pipelines gain nothing.
    set_hayhooks_settings(startup_deploy_strategy=StartupDeployStrategy.SEQUENTIAL)
    allow_deserialization_module("components")  # our pipelines, the JSON variant's YAML included, name our components
    configure_cors()
    # Hayhooks' in-memory trace buffer feeds only its dashboard, which the inventory does not serve; spans still go to
    # an OpenTelemetry exporter configured by the `OTEL_*` settings. Hayhooks records each run in the buffer
    # regardless, and sorts it each time: it keeps one.
    set_hayhooks_settings(tracing_enabled=False, tracing_include_haystack_spans=False, tracing_buffer_capacity=1)
    app = create_hayhooks_app()
    if not cors_enabled(settings):  # Starlette's CORS middleware would still wrap every answer
        remove_middleware(app, CORSMiddleware)
    app.redoc_url = app.swagger_ui_oauth2_redirect_url = None  # FastAPI re-adds its doc routes when a pipeline deploys
    inventory = Inventory(durable=app.state.durable_mode, max_upload_bytes=config.max_upload_bytes)
    app.state.inventory = inventory
    app.add_exception_handler(RequestValidationError, validation_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)  # type: ignore[arg-type]
    # Innermost of the middleware: its refusals still get hayhooks' request id and CORS headers.
    guard = Middleware(
        HTTPGuard,
        api=app,
        inventory=inventory,
        api_keys=ApiKeys(config.api_keys),
        hosts=HostAllowList(settings.host, config.allowed_hosts),
        origins=OriginPolicy(settings),
        body_timeout=config.body_timeout,
        quota=Quota.from_settings(config),
        answers=AnswerBudget(config.max_answer_bytes, config.max_request_pixels),
    )
    append_inner_middleware(app, guard)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, closed bodies closed to unknown fields (as `HTTPGuard` enforces), plus `api_docs`."""
        fresh = app.openapi_schema is None
        schema = build_openapi()
        if fresh:
            closed = {(row.method.lower(), row.path) for row in inventory.routes if row.body and row.body.closed}
            for operation, model in json_bodies(schema).items():
                if operation in closed:
                    model["additionalProperties"] = False
            api_docs.document(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    running = [context for door in DOORS if (context := door.install(app, config)) is not None]
    prune(app, inventory)

    @asynccontextmanager
    async def after_startup(app: FastAPI) -> AsyncIterator[None]:
        """After Hayhooks' startup deploy: what each door runs, the routes it added pruned again, startup frozen."""
        async with contextlib.AsyncExitStack() as doors:
            for context in running:
                await doors.enter_async_context(context())
            prune(app, inventory)
            quiet_per_run_chatter()
            # What startup made (modules, models, the app) lives as long as the process: out of the collector's
            # sight, a full collection no longer walks it. Those walks paused the loop for tens of ms under load.
            gc.freeze()
            yield

    run_inside_lifespan(app, after_startup)
    return app


def main() -> None:
    """Serve on `HAYHOOKS_HOST:HAYHOOKS_PORT` the pipelines in `HAYHOOKS_PIPELINES_DIR`."""
    argparse.ArgumentParser(description=main.__doc__).parse_args()  # settings come from the environment only
    try:
        config = load_settings()
        app = create_app(config)
    except ValueError as e:  # a setting the server cannot start with; the message names it
        sys.exit(f"image-generation-server: {e}")
    trusted_proxies = [str(network) for network in config.trusted_proxies]
    log_through_hayhooks()
    # httptools and uvloop (C) cost less CPU per request than h11 and asyncio; the protocol caps the request head and
    # closes a connection whose client stops reading.
    uvicorn.run(
        access_logged(app, settings.access_log_excluded_path_prefixes),
        host=settings.host,
        port=settings.port,
        http=functools.partial(
            CappedHttpToolsProtocol, send_timeout=config.send_timeout, head_timeout=config.head_timeout
        ),
        loop="uvloop",
        # Uvicorn believes `X-Forwarded-For` from 127.0.0.1 unless told otherwise: only the listed proxies are.
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=trusted_proxies or None,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_config=None,
        access_log=False,  # `access_logged` writes the same line at less cost
        timeout_graceful_shutdown=settings.graceful_shutdown_timeout,
    )
