"""The route inventory: the app answers exactly the routes of the inventory lists, in both of Hayhooks' modes."""

import gc
import json
import re
import urllib.error
import urllib.request

import pytest
from conftest import exchange
from fastapi.testclient import TestClient
from hayhooks import create_app as create_hayhooks_app
from hayhooks.settings import settings

from image_generation_server.app import create_app
from image_generation_server.routes import Inventory, listed_routes

# The routes, written out rather than read from the inventory under test: a row dropped from `ROUTES` (the job
# routes, say) or a route a door stops serving fails here, not only end to end.
IN_BOTH_MODES = {
    ("GET", "/status"),
    ("GET", "/ready"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/swagger-ui-bundle.js"),
    ("GET", "/docs/swagger-ui.css"),
    ("GET", "/docs/favicon.png"),
    ("POST", "/image_generation/run"),
    ("POST", "/image_generation_json/run"),
    ("POST", "/image_editing/run"),
    ("POST", "/image_editing_json/run"),
    ("GET", "/images/{name}"),
    ("DELETE", "/images/{name}"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("GET", "/v1/models"),
    ("POST", "/mcp"),
}
DURABLE_ONLY = {
    ("POST", "/image_generation/run-durable"),
    ("GET", "/image_generation/executions"),
    ("GET", "/image_generation/executions/{execution_id}"),
    ("GET", "/image_generation/executions/{execution_id}/stream"),
    ("POST", "/image_generation/executions/{execution_id}/cancel"),
    ("POST", "/image_generation/executions/{execution_id}/resume"),
    ("POST", "/image_editing/run-durable"),
    ("GET", "/image_editing/executions"),
    ("GET", "/image_editing/executions/{execution_id}"),
    ("GET", "/image_editing/executions/{execution_id}/stream"),
    ("POST", "/image_editing/executions/{execution_id}/cancel"),
    ("POST", "/image_editing/executions/{execution_id}/resume"),
}
OPTIONAL = {("GET", "/"), ("GET", "/static/{name}"), ("GET", "/metrics")}
ANY_METHOD = {"/mcp"}  # served by an ASGI app that takes any method: the guard answers 405 to all but the row's


def expected(durable: bool, optional: bool = True) -> set[tuple[str, str]]:
    """The (method, path) rows of one mode, from the literal table above."""
    return IN_BOTH_MODES | (DURABLE_ONLY if durable else set()) | (OPTIONAL if optional else set())


def served(durable: bool, optional: bool = True) -> set[tuple[str, str]]:
    """`expected()` as the app's router lists it: a route taking any method is `("*", path)`."""
    return {("*" if path in ANY_METHOD else method, path) for method, path in expected(durable, optional)}


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_the_inventory_is_the_table(durable):
    assert {(row.method, row.path) for row in Inventory(durable=durable).routes} == expected(durable)
    assert {(row.method, row.path) for row in Inventory(durable=durable).routes if row.optional} == OPTIONAL


@pytest.mark.parametrize("durable", [False, True], ids=["live", "durable"])
def test_the_app_answers_exactly_the_inventory(hayhooks_settings, monkeypatch, durable):
    """A Hayhooks upgrade that adds a route, or a door that adds one without its row, fails here."""
    monkeypatch.setattr(settings, "durable_mode", durable)
    monkeypatch.setenv("IMAGE_GENERATION_METRICS_KEY", "scrape-key")  # turns on the optional rows' routes
    app = create_app()
    assert listed_routes(app) <= served(durable)
    with TestClient(app, base_url="http://localhost"):  # runs the startup deploy (live mode adds routes then)
        assert listed_routes(app) == served(durable)
        assert "/deploy_files" not in json.dumps(app.openapi())


def test_optional_routes_are_absent_when_turned_off(hayhooks_settings, monkeypatch):
    monkeypatch.setattr(settings, "durable_mode", False)
    monkeypatch.setenv("IMAGE_GENERATION_UI", "false")
    monkeypatch.delenv("IMAGE_GENERATION_METRICS_KEY", raising=False)
    app = create_app()
    with TestClient(app, base_url="http://localhost"):
        assert listed_routes(app) == served(durable=False, optional=False)


def test_hayhooks_serves_routes_the_inventory_leaves_out(hayhooks_settings):
    """The other half of the comparison: what would be open without the inventory (if this fails, simplify)."""
    unlisted = listed_routes(create_hayhooks_app()) - served(durable=False)
    assert {("POST", "/deploy_files"), ("POST", "/deploy-yaml"), ("GET", "/draw/{pipeline_name}")} <= unlisted
    assert {("POST", "/v1/files"), ("POST", "/v1/chat/completions"), ("GET", "/traces")} <= unlisted


def test_startup_leaves_what_it_made_out_of_the_garbage_collector(hayhooks_settings):
    """`gc.freeze()` after startup: a full collection no longer walks the app, the models and the modules."""
    gc.unfreeze()
    try:
        with TestClient(create_app(), base_url="http://localhost"):
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_a_route_added_after_startup_is_not_reachable(hayhooks_settings, monkeypatch):
    """The guard refuses what no row lists, whenever it was added."""
    monkeypatch.setattr(settings, "durable_mode", False)
    app = create_app()
    with TestClient(app, base_url="http://localhost") as client:
        app.add_api_route("/late", lambda: {"ok": True}, methods=["GET"])
        app.add_api_route("/status", lambda: {"ok": True}, methods=["DELETE"])
        assert client.get("/late").status_code == 404
        assert client.delete("/status").status_code == 405
        assert client.get("/status").status_code == 200


def concrete(path: str) -> str:
    """A request path for a path template: each parameter becomes `x`."""
    return re.sub(r"\{[^}]+\}", "x", path)


NOT_SERVED = {(404, b'{"detail":"Not Found"}'), (405, b'{"detail":"Method Not Allowed"}')}


def request(server, method: str, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(f"{server.url}{path}", method=method, data=b"{}" if method == "POST" else None,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_running_server_refuses_every_route_hayhooks_would_add(server, hayhooks_settings, fresh_upstream):
    unlisted = listed_routes(create_hayhooks_app()) - served(durable=False)
    answers = {(method, path): request(server, method, concrete(path)) for method, path in sorted(unlisted)}
    assert set(answers.values()) <= NOT_SERVED, answers
    assert fresh_upstream.requests == []


SERVED_BY_DEFAULT = sorted(expected(durable=False) - {("GET", "/metrics")})  # metrics: off by default


@pytest.mark.parametrize(("method", "path"), SERVED_BY_DEFAULT, ids=[path for _, path in SERVED_BY_DEFAULT])
def test_a_running_server_answers_every_row(server, fresh_upstream, method, path):
    path = concrete(path).replace("/static/x", "/static/page.js")
    assert request(server, method, path) not in NOT_SERVED  # a route's own 404 (no such image) names its cause


GET_ROUTES = [path for method, path in SERVED_BY_DEFAULT if method == "GET"]


@pytest.mark.parametrize("path", GET_ROUTES, ids=GET_ROUTES)
def test_head_answers_every_get_route_as_get_does_without_a_body(server, fresh_upstream, path):
    """HEAD was a 405 on the GET routes FastAPI declares (issue 22): now the same status and headers, no body."""
    path = concrete(path).replace("/static/x", "/static/page.js")
    status, headers, body = exchange(server, "GET", path)
    head_status, head_headers, head_body = exchange(server, "HEAD", path)
    assert (head_status, head_body) == (status, b"")
    assert head_headers["content-type"] == headers["content-type"]
    assert head_headers.get("content-length") == headers.get("content-length", str(len(body)))


def test_upload_rows_take_the_upload_cap():
    """`IMAGE_GENERATION_MAX_UPLOAD_BYTES` caps the bodies that carry an image to edit; the others keep 64 KB."""
    inventory = Inventory(durable=True, max_upload_bytes=1234)
    capped = {row.path for row in inventory.routes if row.body is not None and row.body.max_bytes == 1234}
    assert capped == {
        "/image_editing/run", "/image_editing_json/run", "/v1/images/edits", "/mcp", "/image_editing/run-durable"
    }  # fmt: skip
    assert {row.body.max_bytes for row in inventory.routes if row.body and row.path not in capped} <= {64 * 1024, 1024}
