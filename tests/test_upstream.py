"""
Each private (or undocumented) part of Hayhooks, FastAPI, Starlette, huggingface_hub and diffusers that the code
relies on, checked for the shape it relies on: an upgrade that moves one fails here, by name, rather than somewhere
downstream. `docs/upstream.md` says why each is needed and what upstream change would remove it. Hayhooks' durable
internals have their own checks in tests/test_durable_queue.py.
"""

import inspect
from contextlib import asynccontextmanager

import hayhooks.server.utils.deploy_utils
import pytest
from diffusers import StableDiffusionPipeline
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import _IncludedRouter
from fastapi.testclient import TestClient
from hayhooks import create_app as create_hayhooks_app
from hayhooks.settings import AppSettings
from huggingface_hub.inference._common import MimeBytes
from huggingface_hub.inference._providers import PROVIDERS, TaskProviderHelper
from starlette.middleware import Middleware

from components.hf_providers import EDIT_TASK, SUPPORTED_EDIT_PROVIDERS, SUPPORTED_PROVIDERS
from image_generation_server.log import PER_RUN_CHATTER
from image_generation_server.routes import listed_routes


def test_fastapi_keeps_an_included_router_as_a_private_included_router():
    """`routes.prune` and `routes.listed_routes` walk `_IncludedRouter(original_router, include_context.prefix)`."""
    router = APIRouter()
    router.add_api_route("/x", lambda: None, methods=["GET"])
    app = FastAPI()
    app.include_router(router, prefix="/p")
    [included] = [route for route in app.router.routes if isinstance(route, _IncludedRouter)]
    assert included.original_router is router
    assert included.include_context.prefix == "/p"
    copied = _IncludedRouter(original_router=router, include_context=included.include_context)  # as prune rebuilds it
    assert copied.original_router is router
    assert ("GET", "/p/x") in listed_routes(app)


def test_starlette_runs_whatever_lifespan_context_the_router_holds():
    """`app.create_app` wraps Hayhooks' lifespan by replacing `app.router.lifespan_context` (the one place it does)."""
    entered = []
    app = FastAPI()
    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(served: FastAPI):
        async with original(served):
            entered.append(True)
            yield

    app.router.lifespan_context = lifespan
    with TestClient(app):
        assert entered == [True]


def test_hayhooks_serves_the_routes_we_shadow_and_adds_cors_middleware(hayhooks_settings):
    """
    Our `/status` and `/v1/models` go first in the route list (Starlette's first match wins) because Hayhooks' app
    has its own; our guard is appended to `user_middleware` (the innermost) and Hayhooks' CORS middleware is
    removed from it when no origin is allowed. When Hayhooks stops adding one of these, drop our workaround.
    """
    app = create_hayhooks_app()
    assert {("GET", "/status"), ("GET", "/v1/models")} <= listed_routes(app)
    assert CORSMiddleware in [middleware.cls for middleware in app.user_middleware]
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
    plain.user_middleware.append(Middleware(recording("appended")))
    plain.add_middleware(recording("added"))
    with TestClient(plain) as client:
        client.get("/x")
    assert order == ["added", "appended"]  # appended last: innermost, next to the routes


@pytest.mark.parametrize("field", ["startup_deploy_strategy", "tracing_enabled", "tracing_include_haystack_spans",
                                   "tracing_buffer_capacity", "cors_allow_origins", "cors_allow_methods",
                                   "cors_allow_headers", "cors_expose_headers", "durable_store"])  # fmt: skip
def test_hayhooks_settings_we_set_in_process_exist(field):
    """`app.create_app` and `jobs` set these on Hayhooks' process-wide settings object before it builds the app."""
    assert field in AppSettings.model_fields
    assert "model_fields_set" in dir(AppSettings())  # `access.configure_cors` keeps what the operator set


def test_hayhooks_logs_each_run_from_handle_request():
    """`log.PER_RUN_CHATTER` names the module and function of Hayhooks' per-run INFO lines, to filter them."""
    module, function = PER_RUN_CHATTER
    assert module == hayhooks.server.utils.deploy_utils.__name__
    source = inspect.getsource(hayhooks.server.utils.deploy_utils)
    body = source[source.index(f"async def {function}(") :]
    assert '.info("Running pipeline' in body[: body.find("\n    return ")]


@pytest.mark.parametrize(
    ("provider", "task"),
    [*((p, "text-to-image") for p in SUPPORTED_PROVIDERS), *((p, EDIT_TASK) for p in SUPPORTED_EDIT_PROVIDERS)],
)
def test_huggingface_hub_provider_helpers_have_the_shape_hf_providers_uses(provider, task):
    """
    `hf_providers` takes the request-building helper from the private `PROVIDERS` table and answers its two private
    steps (API key, Hub mapping) itself, on a copy made with `object.__new__`, so that nothing asks the Hub or the
    stored login.
    """
    helper = PROVIDERS[provider][task]
    assert isinstance(helper, TaskProviderHelper)
    assert list(inspect.signature(helper._prepare_api_key).parameters) == ["api_key"]
    assert list(inspect.signature(helper._prepare_mapping_info).parameters) == ["model"]
    parameters = inspect.signature(helper.prepare_request).parameters
    assert {"inputs", "parameters", "headers", "model", "api_key"} <= set(parameters)
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY for parameter in parameters.values())
    clone = object.__new__(type(helper))
    clone.__dict__.update(helper.__dict__)
    assert type(clone) is type(helper)
    assert not hasattr(type(helper), "__slots__") or "__dict__" in dir(clone)


def test_huggingface_hub_mime_bytes_carries_an_images_type():
    """An edit's image goes to the provider helper as the private `MimeBytes(data, mime_type)`."""
    data = MimeBytes(b"\x89PNG", "image/png")
    assert (bytes(data), data.mime_type) == (b"\x89PNG", "image/png")


def test_diffusers_stops_at_the_next_step_when_interrupt_is_set():
    """`DiffusersTextToImage` cancels a generation by setting `pipeline._interrupt` (diffusers' documented way)."""
    assert "self._interrupt = False" in inspect.getsource(StableDiffusionPipeline.__call__)
    assert "if self.interrupt:" in inspect.getsource(StableDiffusionPipeline.__call__)
    assert "return self._interrupt" in inspect.getsource(StableDiffusionPipeline.interrupt.fget)
