"""
Each private (or undocumented) part of Hayhooks, Haystack, FastAPI, Starlette, huggingface_hub and diffusers that the
code relies on, checked for the shape it relies on: an upgrade that moves one fails here, by name, rather than somewhere
downstream. The touchpoints live in one module per library (`image_generation_server/private_fastapi.py`,
`private_starlette.py`, `private_hayhooks.py`, `private_haystack.py`, `components/private_huggingface_hub.py`), and
no other module touches them. `docs/upstream.md` says why each is needed and what upstream change would remove it.
Hayhooks' durable internals have their own checks in tests/test_durable_queue.py.
"""

import ast
import asyncio
import inspect
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import hayhooks.server.utils.deploy_utils
import pytest
from conftest import ROOT, served_code
from diffusers import StableDiffusionPipeline
from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import _IncludedRouter
from fastapi.testclient import TestClient
from hayhooks import create_app as create_hayhooks_app
from hayhooks.dashboard_auth import require_tracing_access
from hayhooks.server.logger import intercept_stdlib_logging
from hayhooks.server.routers.status import StatusResponse, status_all
from hayhooks.settings import AppSettings
from haystack import Pipeline, component
from huggingface_hub.hf_api import InferenceProviderMapping
from huggingface_hub.inference._common import MimeBytes
from huggingface_hub.inference._providers import PROVIDERS, TaskProviderHelper
from starlette.middleware import Middleware

from components.hf_providers import EDIT_TASK, SUPPORTED_EDIT_PROVIDERS, SUPPORTED_PROVIDERS, TASK
from components.private_huggingface_hub import image_input, prepare_request_offline, provider_helper
from image_generation_server.generation import load_pipeline
from image_generation_server.private_fastapi import drop_routes, included_routes
from image_generation_server.private_hayhooks import PER_RUN_CHATTER
from image_generation_server.private_haystack import AS_IS, COPYING_MODULES, HAYSTACK_COPY, copy_value
from image_generation_server.private_starlette import (
    append_inner_middleware,
    move_ahead,
    remove_middleware,
    run_inside_lifespan,
)
from image_generation_server.routes import listed_routes
from image_generation_server.settings import load_settings

# The modules that hold the touchpoints, one per library.
PRIVATE_MODULES = {
    "components/private_huggingface_hub.py",
    "image_generation_server/private_fastapi.py",
    "image_generation_server/private_hayhooks.py",
    "image_generation_server/private_haystack.py",
    "image_generation_server/private_starlette.py",
}
# Private (or internal) names of the libraries: an attribute, a name or an imported name.
PRIVATE_NAMES = {
    "_IncludedRouter", "original_router", "include_context",  # FastAPI
    "lifespan_context", "user_middleware",  # Starlette
    "_deployments", "_runnable", "_controls", "_expire_control",  # Hayhooks' durable stores
    "PROVIDERS", "TaskProviderHelper", "MimeBytes", "_prepare_api_key", "_prepare_mapping_info",  # huggingface_hub
    "_deepcopy_with_exceptions",  # Haystack
}  # fmt: skip
# Internal modules: Hayhooks' server internals and its dashboard's access check, any module named with an underscore.
PRIVATE_MODULE_PREFIXES = ("hayhooks.server", "hayhooks.dashboard_auth")


def private_uses(tree: ast.Module) -> set[str]:
    """The private touchpoints a module's code uses (what only the `private_*` modules may)."""
    found: set[str] = set()
    hayhooks_settings = set()  # the names `hayhooks.settings.settings` is imported under
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PRIVATE_MODULE_PREFIXES) or any(
                part.startswith("_") for part in node.module.split(".")
            ):
                found.add(node.module)
            found |= {alias.name for alias in node.names} & PRIVATE_NAMES
            if node.module == "hayhooks.settings":
                hayhooks_settings |= {alias.asname or alias.name for alias in node.names if alias.name == "settings"}
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.add(node.attr)
        elif isinstance(node, ast.Name) and node.id in PRIVATE_NAMES:
            found.add(node.id)
        if isinstance(node, ast.Attribute) and node.attr == "__new__" and getattr(node.value, "id", None) == "object":
            found.add("object.__new__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "insert":
            if isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "routes":
                found.add("routes.insert")  # reordering routes: `private_starlette.move_ahead`
    for node in ast.walk(tree):  # writes to Hayhooks' process-wide settings
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="", ctx=ast.Store())]
        for target in targets:
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) in hayhooks_settings:
                found.add("hayhooks.settings write")
    return found


def test_only_the_private_modules_touch_private_parts():
    """A private touchpoint outside the `private_*` modules fails here: add it to its library's module instead."""
    code = served_code()
    assert PRIVATE_MODULES <= set(code)
    outside = {path: uses for path, tree in code.items() if path not in PRIVATE_MODULES if (uses := private_uses(tree))}
    assert not outside, f"private touchpoints outside the private_* modules: {outside}"
    inside = set().union(*(private_uses(code[path]) for path in PRIVATE_MODULES))
    assert PRIVATE_NAMES | {"object.__new__", "routes.insert", "hayhooks.settings write"} <= inside  # none stale
    sample = (
        "from hayhooks.settings import settings as s\n"
        "from hayhooks.server.logger import formatter\n"
        "s.tracing_enabled = False\n"
        "setattr(s, 'cors_allow_origins', [])\n"
        "app.user_middleware.append(m)\n"
        "app.router.routes.insert(0, r)\n"
        "object.__new__(T)\n"
    )
    assert private_uses(ast.parse(sample)) == {
        "hayhooks.server.logger", "hayhooks.settings write", "user_middleware", "routes.insert", "object.__new__",
    }  # fmt: skip


def test_private_fastapi_walks_and_drops_included_routers():
    """
    `private_fastapi` walks `_IncludedRouter(original_router, include_context.prefix)` and rebuilds it to drop routes.
    """
    router = APIRouter()
    router.add_api_route("/x", lambda: None, methods=["GET"])
    router.add_api_route("/y", lambda: None, methods=["GET"])
    app = FastAPI()
    app.include_router(router, prefix="/p")
    [included] = [route for route in app.router.routes if isinstance(route, _IncludedRouter)]
    assert included.original_router is router
    assert included.include_context.prefix == "/p"
    assert {("GET", "/p/x"), ("GET", "/p/y")} <= listed_routes(app)
    asked = []

    def keep(route, path: str) -> bool:
        asked.append(path)
        return path != "/p/y"

    drop_routes(app, keep)
    assert [path for _, path in included_routes(app)] == [path for path in asked if path != "/p/y"]
    assert ("GET", "/p/x") in listed_routes(app) and ("GET", "/p/y") not in listed_routes(app)
    assert [route.path for route in router.routes] == ["/x", "/y"]  # the included router itself is left whole
    with TestClient(app) as client:
        assert client.get("/p/x").status_code == 200
        assert client.get("/p/y").status_code == 404


def test_private_starlette_runs_our_startup_inside_the_lifespan_the_router_holds():
    """`private_starlette.run_inside_lifespan` wraps `app.router.lifespan_context` (Hayhooks' own lifespan)."""
    events = []

    @asynccontextmanager
    async def outer(app: FastAPI):
        events.append("outer started")
        yield {"state": 1}
        events.append("outer stopped")

    @asynccontextmanager
    async def inner(app: FastAPI):
        events.append("inner started")
        yield
        events.append("inner stopped")

    def state(request: Request) -> int:
        return request.state.state

    app = FastAPI(lifespan=outer)
    app.add_api_route("/x", state, methods=["GET"])
    run_inside_lifespan(app, inner)
    with TestClient(app) as client:
        assert events == ["outer started", "inner started"]
        assert client.get("/x").json() == 1  # the outer lifespan's state reaches the requests
    assert events == ["outer started", "inner started", "inner stopped", "outer stopped"]


def test_private_starlette_appends_innermost_and_removes_hayhooks_cors(hayhooks_settings):
    """
    Our guard goes innermost (`append_inner_middleware`); Hayhooks always adds `CORSMiddleware`, which
    `remove_middleware` takes out when no origin is allowed.
    """
    app = create_hayhooks_app()
    assert CORSMiddleware in [middleware.cls for middleware in app.user_middleware]
    remove_middleware(app, CORSMiddleware)
    assert CORSMiddleware not in [middleware.cls for middleware in app.user_middleware]
    order = []

    def recording(name: str):
        class Recording:
            def __init__(self, app) -> None:
                self.app = app

            async def __call__(self, scope, receive, send) -> None:
                if scope["type"] == "http":
                    order.append(name)
                await self.app(scope, receive, send)

        return Recording

    plain = FastAPI()
    plain.add_api_route("/x", lambda: None, methods=["GET"])
    append_inner_middleware(plain, Middleware(recording("appended")))
    plain.add_middleware(recording("added"))
    with TestClient(plain) as client:
        client.get("/x")
    assert order == ["added", "appended"]  # appended last: innermost, next to the routes


def test_private_starlette_moves_our_route_ahead_of_hayhooks(hayhooks_settings):
    """Hayhooks serves `/status` and `/v1/models` itself; `move_ahead` puts ours first (the first match answers)."""
    assert {("GET", "/status"), ("GET", "/v1/models")} <= listed_routes(create_hayhooks_app())
    app = FastAPI()
    app.add_api_route("/status", lambda: "theirs", methods=["GET"])
    app.add_api_route("/status", lambda: "ours", methods=["GET"])
    with TestClient(app) as client:
        assert client.get("/status").json() == "theirs"
        move_ahead(app)
        assert client.get("/status").json() == "ours"


@pytest.mark.parametrize("field", ["startup_deploy_strategy", "tracing_enabled", "tracing_include_haystack_spans",
                                   "tracing_buffer_capacity", "cors_allow_origins", "cors_allow_methods",
                                   "cors_allow_headers", "cors_expose_headers", "durable_store",
                                   "durable_max_nonterminal_executions", "durable_terminal_ttl_seconds"])  # fmt: skip
def test_private_hayhooks_settings_we_set_in_process_exist(field, monkeypatch):
    """
    `private_hayhooks.set_hayhooks_settings` (`app.create_app`, `jobs`) sets these on Hayhooks' process-wide settings
    before it builds the app; `default_hayhooks_settings` only those the environment left out (`model_fields_set`).
    """
    monkeypatch.delenv(f"HAYHOOKS_{field.upper()}", raising=False)
    assert field in AppSettings.model_fields
    assert field in AppSettings(**{field: getattr(AppSettings(), field)}).model_fields_set
    assert field not in AppSettings().model_fields_set


def test_private_hayhooks_logs_each_run_from_handle_request():
    """`private_hayhooks.PER_RUN_CHATTER` names the module and function of Hayhooks' per-run INFO lines."""
    module, function = PER_RUN_CHATTER
    assert module == hayhooks.server.utils.deploy_utils.__name__
    source = inspect.getsource(hayhooks.server.utils.deploy_utils)
    body = source[source.index(f"async def {function}(") :]
    assert '.info("Running pipeline' in body[: body.find("\n    return ")]


def test_private_hayhooks_log_bridge_takes_loggers_and_excluded_paths():
    """`private_hayhooks.log_through_hayhooks` calls Hayhooks' internal `intercept_stdlib_logging` as its `run` does."""
    parameters = inspect.signature(intercept_stdlib_logging).parameters
    assert list(parameters) == ["loggers", "access_log_excluded_path_prefixes"]
    assert {"intercepted_loggers", "access_log_excluded_path_prefixes"} <= set(AppSettings.model_fields)


def test_private_hayhooks_status_answer_and_its_access_check():
    """`private_hayhooks.hayhooks_status` and `is_operator`: Hayhooks' `/status` handler and its dashboard check."""
    assert list(inspect.signature(status_all).parameters) == ["request"]
    assert inspect.iscoroutinefunction(status_all)
    assert {"status", "pipelines"} <= set(StatusResponse.model_fields)
    [parameter] = inspect.signature(require_tracing_access).parameters.values()
    assert parameter.annotation in (Request, "Request")


def test_private_haystack_copy_is_called_by_the_name_we_replace():
    """`private_haystack` replaces `_deepcopy_with_exceptions` where Haystack's pipelines call it by that name."""
    name = "_deepcopy_with_exceptions"
    assert (HAYSTACK_COPY.__module__, HAYSTACK_COPY.__name__) == ("haystack.core.pipeline.utils", name)
    for module in COPYING_MODULES:
        assert f"{name}(" in inspect.getsource(module), module.__name__
    assert inspect.getsource(HAYSTACK_COPY).count(f"{name}(v)") >= 2  # into lists and dicts: by the module's name


def test_private_haystack_gives_each_run_what_haystack_would(tmp_path):
    """
    What Haystack's copy returns unchanged is handed over as it is; anything else is still copied, in a real run.
    """
    samples = [None, True, 7, 1.5, "a prompt", b"bytes", test_only_the_private_modules_touch_private_parts, len]
    assert {type(value) for value in samples} == AS_IS
    for value in samples:
        assert HAYSTACK_COPY(value) is value and copy_value(value) is value
    nested = {"list": [1, "x", {"y": [2]}], "tuple": ("z", [3])}
    assert copy_value(nested) == nested and copy_value(nested)["list"][2] is not nested["list"][2]

    @component
    class Keeper:
        @component.output_types(seen=list)
        def run(self, text: str, items: list, callback: Callable | None = None) -> dict[str, Any]:
            items.append("changed by the component")
            return {"seen": [text, items, callback]}

    pipe = load_pipeline(ROOT / "pipelines", load_settings())  # what every door loads: it applies the change
    assert all(module._deepcopy_with_exceptions is copy_value for module in COPYING_MODULES)
    pipe = Pipeline()
    pipe.add_component("keeper", Keeper())
    text, items = "a prompt " * 3, ["one"]
    [seen_text, seen_items, seen_callback] = asyncio.run(
        pipe.run_async({"keeper": {"text": text, "items": items, "callback": print}})
    )["keeper"]["seen"]
    assert seen_text is text and seen_callback is print
    assert items == ["one"] and seen_items == ["one", "changed by the component"]


@pytest.mark.parametrize(
    ("provider", "task"),
    [*((p, TASK) for p in SUPPORTED_PROVIDERS), *((p, EDIT_TASK) for p in SUPPORTED_EDIT_PROVIDERS)],
)
def test_private_huggingface_hub_provider_helpers_have_the_shape_used(provider, task):
    """
    `private_huggingface_hub` takes the request-building helper from the private `PROVIDERS` table and answers its
    two private steps (API key, Hub mapping) itself, on a copy made with `object.__new__`.
    """
    helper = PROVIDERS[provider][task]
    assert isinstance(helper, TaskProviderHelper) and provider_helper(provider, task) is helper
    assert list(inspect.signature(helper._prepare_api_key).parameters) == ["api_key"]
    assert list(inspect.signature(helper._prepare_mapping_info).parameters) == ["model"]
    parameters = inspect.signature(helper.prepare_request).parameters
    assert {"inputs", "parameters", "headers", "model", "api_key"} <= set(parameters)
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in parameters.values())
    assert not hasattr(type(helper), "__slots__") or "__dict__" in dir(helper)


def test_private_huggingface_hub_prepares_a_request_with_our_mapping_and_token(monkeypatch):
    """The request is built from the mapping and token given, offline: no Hub lookup, no stored login."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mapping = InferenceProviderMapping(
        provider="together", hf_model_id="org/model", providerId="together/model-x", status="live", task=TASK
    )
    request = prepare_request_offline(
        provider_helper("together", TASK), mapping, "our-token", inputs="a lighthouse", parameters={"width": 64},
        headers={"Accept": "image/png"}, model="org/model", api_key="our-token",
    )  # fmt: skip
    assert request.json["model"] == "together/model-x" and request.json["prompt"] == "a lighthouse"
    assert request.headers["authorization"] == "Bearer our-token"


def test_private_huggingface_hub_mime_bytes_carries_an_images_type():
    """An edit's image goes to the provider helper as the private `MimeBytes(data, mime_type)`."""
    data = image_input(b"\x89PNG", "image/png")
    assert isinstance(data, MimeBytes)
    assert (bytes(data), data.mime_type) == (b"\x89PNG", "image/png")


def test_diffusers_stops_at_the_next_step_when_interrupt_is_set():
    """`DiffusersTextToImage` cancels a generation by setting `pipeline._interrupt` (diffusers' documented way)."""
    assert "self._interrupt = False" in inspect.getsource(StableDiffusionPipeline.__call__)
    assert "if self.interrupt:" in inspect.getsource(StableDiffusionPipeline.__call__)
    assert "return self._interrupt" in inspect.getsource(StableDiffusionPipeline.interrupt.fget)
