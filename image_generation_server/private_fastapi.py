"""
FastAPI's private parts this service relies on: included routers, walked and pruned.

Since FastAPI 0.16x an included router stays in `app.router.routes` as the private `fastapi.routing._IncludedRouter`
(its `original_router` and `include_context.prefix`), flattened lazily. Hayhooks' `create_app()` includes every router
and takes no list of them, so the route inventory walks and rebuilds them to list and drop routes. A public
`app.router.iter_routes()` and a way to remove an included router would remove this module (docs/upstream.md);
tests/test_upstream.py checks the shape it relies on.
"""

import copy
from collections.abc import Callable, Iterator

from fastapi import FastAPI
from fastapi.routing import _IncludedRouter
from starlette.routing import BaseRoute


def included_routes(app: FastAPI) -> Iterator[tuple[BaseRoute, str]]:
    """Each route of the app with its full path, in the order Starlette matches them, included routers flattened."""
    return _walk(app.router.routes, "")


def drop_routes(app: FastAPI, keep: Callable[[BaseRoute, str], bool]) -> None:
    """
    Remove from `app` each route (with its full path) that `keep` refuses, asked in the order Starlette matches.

    Included routers are copied before their routes are filtered (Hayhooks' routers are module globals that another
    app in the same process may still include whole); one left empty is removed.
    """
    app.router.routes[:] = _kept(app.router.routes, "", keep)


def _walk(routes: list[BaseRoute], prefix: str) -> Iterator[tuple[BaseRoute, str]]:
    for route in routes:
        if isinstance(route, _IncludedRouter):
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            yield route, prefix + getattr(route, "path", "")


def _kept(routes: list[BaseRoute], prefix: str, keep: Callable[[BaseRoute, str], bool]) -> list[BaseRoute]:
    kept: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, _IncludedRouter):
            router = copy.copy(route.original_router)
            router.routes = _kept(router.routes, prefix + route.include_context.prefix, keep)
            if router.routes:
                kept.append(_IncludedRouter(original_router=router, include_context=route.include_context))
        elif keep(route, prefix + getattr(route, "path", "")):
            kept.append(route)
    return kept
