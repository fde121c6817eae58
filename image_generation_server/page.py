"""
The web page at `/` and Swagger's `/docs`, both working offline.

The page is plain HTML, CSS and JavaScript from `static/` (no build step, nothing from a CDN) and uses only
the public API. Every file is read once at startup and served with a strong ETag (`If-None-Match` gets a 304) and a
strict Content-Security-Policy: no inline script or style, requests only to this server. `/docs` is FastAPI's
Swagger UI with its assets served from here (the pinned `fastapi-offline` package ships them), under its own policy
that allows exactly its one inline script by hash. `IMAGE_GENERATION_UI=false` turns the page off.
"""

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html

from components.errors import PipelineNotServedError
from components.request import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    OUTPUT_FORMATS,
    SIZE_MULTIPLE,
    GenerationRequest,
)
from image_generation_server.generation import COMPONENT, served_pipeline
from image_generation_server.responses import etag_matches
from image_generation_server.settings import Settings

STATIC = Path(__file__).with_name("static")
SWAGGER_ASSETS = files("fastapi_offline") / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'none'; script-src 'self' {scripts}; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
FORMAT_LABELS = {name: "WebP" if name == "webp" else name.upper() for name in OUTPUT_FORMATS}
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@dataclass(frozen=True)
class Asset:
    """A file served as it is, with its ETag and the Content-Security-Policy of the page it belongs to."""

    body: bytes
    media_type: str
    csp: str

    @property
    def etag(self) -> str:
        """A strong ETag: a hash of the bytes."""
        return '"' + hashlib.sha256(self.body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        """The file, or a 304 when the request's `If-None-Match` already names it."""
        headers = {
            "ETag": self.etag,
            "Cache-Control": "no-cache",  # revalidate every time: a new release is seen at once, unchanged is a 304
            "Content-Security-Policy": self.csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        if etag_matches(request.headers.get("if-none-match"), self.etag):
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the page at `/` and its files under `/static/` (unless turned off), and `/docs` from local assets."""
    _install_docs(app)
    if not settings.ui:
        return
    template = Template((STATIC / "index.html").read_text())
    page: list[Asset] = []  # rendered at the first request, once the pipeline is deployed, then kept
    assets = {
        path.name: Asset(path.read_bytes(), MEDIA_TYPES[path.suffix], PAGE_CSP)
        for path in sorted(STATIC.iterdir())
        if path.suffix in MEDIA_TYPES and path.name != "index.html"
    }

    async def static(name: str, request: Request) -> Response:
        if name not in assets:
            raise HTTPException(404, "Not Found")
        return assets[name].response(request)

    async def index(request: Request) -> Response:
        if page:
            return page[0].response(request)
        try:
            defaults = served_pipeline(app).get_component(COMPONENT).defaults
        except PipelineNotServedError:  # not (yet) deployed: the fields start empty, which means the defaults
            return _render(template, None).response(request)
        page.append(_render(template, defaults))
        return page[0].response(request)

    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/{name}", static, methods=["GET"], include_in_schema=False)


def _install_docs(app: FastAPI) -> None:
    """Replace FastAPI's `/docs` (scripts from a CDN) by the same Swagger UI with its assets served from here."""
    if not app.docs_url or not app.openapi_url:
        return
    docs_url, root = app.docs_url, app.root_path
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) != docs_url]
    html = get_swagger_ui_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{docs_url}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{docs_url}/swagger-ui.css",
        swagger_favicon_url=f"{root}{docs_url}/favicon.png",
        oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
    ).body
    scripts = INLINE_SCRIPT.findall(html.decode())
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = DOCS_CSP.format(scripts=hashes)
    docs = {
        "": Asset(html, MEDIA_TYPES[".html"], csp),
        "/swagger-ui-bundle.js": Asset((SWAGGER_ASSETS / "swagger-ui-bundle.js").read_bytes(), MEDIA_TYPES[".js"], csp),
        "/swagger-ui.css": Asset((SWAGGER_ASSETS / "swagger-ui.css").read_bytes(), MEDIA_TYPES[".css"], csp),
        "/favicon.png": Asset((SWAGGER_ASSETS / "favicon.png").read_bytes(), "image/png", csp),
    }
    for suffix, asset in docs.items():
        app.add_api_route(docs_url + suffix, _endpoint(asset), methods=["GET"], include_in_schema=False)


def _render(template: Template, defaults: GenerationRequest | None) -> Asset:
    """The page with the request model's limits, its form filled with the served pipeline's defaults."""
    chosen = defaults.output_format if defaults else None
    formats = "".join(
        f'<option value="{name}"{" selected" if name == chosen else ""}>{label}</option>'
        for name, label in FORMAT_LABELS.items()
    )
    values = {
        "min_size": MIN_SIZE,
        "max_size": MAX_SIZE,
        "size_multiple": SIZE_MULTIPLE,
        "max_steps": MAX_STEPS,
        "max_guidance": f"{MAX_GUIDANCE:g}",
        "max_seed": MAX_SEED,
        "max_prompt_chars": MAX_PROMPT_CHARS,
        "width": defaults.width if defaults else "",
        "height": defaults.height if defaults else "",
        "format_options": formats,
    }
    return Asset(template.substitute(values).encode(), MEDIA_TYPES[".html"], PAGE_CSP)


def _endpoint(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
    """A route endpoint that serves `asset`."""

    async def serve(request: Request) -> Response:
        return asset.response(request)

    return serve
