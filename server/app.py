"""The service: Hayhooks' app with `HTTPGuard` in front of its run routes, served by Uvicorn."""

import argparse
from typing import Any

from fastapi import FastAPI
from hayhooks import create_app as create_hayhooks_app
from hayhooks import run_app
from starlette.middleware import Middleware

from server import api_docs, image_store, mcp, metrics, openai_images, page
from server.guard import HTTPGuard, api_keys_from_env, run_bodies
from server.jobs import configure_durable_mode
from server.quota import Quota

# The doors beside the pipelines' own run routes: each module's `install(app)` adds its routes to the app.
DOORS: tuple = (metrics, page, image_store, openai_images, mcp)


def create_app() -> FastAPI:
    """
    Hayhooks' app, configured by its `HAYHOOKS_*` settings, with `HTTPGuard` added.

    Also an app factory for `uvicorn --factory server.app:create_app`, e.g. with `--workers`.
    """
    configure_durable_mode()
    app = create_hayhooks_app()
    # Innermost of the middleware: its refusals still get hayhooks' request id and CORS headers.
    app.user_middleware.append(Middleware(HTTPGuard, api=app, api_keys=api_keys_from_env(), quota=Quota.from_env()))
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, run bodies closed to unknown fields (as `HTTPGuard` enforces), completed by `api_docs`."""
        fresh = app.openapi_schema is None
        schema = build_openapi()
        if fresh:
            for model in run_bodies(schema).values():
                model["additionalProperties"] = False
            api_docs.document(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    for door in DOORS:
        door.install(app)
    return app


def main() -> None:
    """Serve on `HAYHOOKS_HOST:HAYHOOKS_PORT` the pipelines in `HAYHOOKS_PIPELINES_DIR`."""
    argparse.ArgumentParser(description=main.__doc__).parse_args()  # settings come from the environment only
    run_app(create_app())
