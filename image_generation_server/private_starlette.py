"""
Starlette's app internals changed after Hayhooks has built the app: its lifespan, middleware list and route order.

Hayhooks' `create_app()` takes no lifespan, no middleware and no routers of ours, so the app it returns is adjusted:
our startup runs inside Hayhooks' lifespan (`app.router.lifespan_context`, replaced once), our guard goes innermost
in `app.user_middleware` (`add_middleware` puts a middleware outermost, outside Hayhooks' request id and CORS), and
a route of ours goes to the front of `app.router.routes` where Hayhooks serves the same path (Starlette answers with
the first match). `create_app(lifespan=..., middleware=..., routers=...)` in Hayhooks would remove this module
(docs/upstream.md); tests/test_upstream.py checks the behaviour each function relies on.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware


def run_inside_lifespan(app: FastAPI, inner: Callable[[FastAPI], AbstractAsyncContextManager[None]]) -> None:
    """Make `inner(app)` run inside the app's lifespan (entered after its startup, left before its shutdown)."""
    outer = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with outer(app) as state, inner(app):
            yield state

    app.router.lifespan_context = lifespan


def append_inner_middleware(app: FastAPI, middleware: Middleware) -> None:
    """Add `middleware` innermost: inside every middleware added so far, next to the routes."""
    app.user_middleware.append(middleware)


def remove_middleware(app: FastAPI, cls: type) -> None:
    """Remove every middleware of class `cls` from the app's middleware list."""
    app.user_middleware = [middleware for middleware in app.user_middleware if middleware.cls is not cls]


def move_ahead(app: FastAPI) -> None:
    """Move the route (or included router) added last to the front, so that it answers before any other at its path."""
    app.router.routes.insert(0, app.router.routes.pop())
