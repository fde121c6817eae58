"""
The web page at `/`, driven the way a person uses it, in a real headless chromium (tests/browser.py), against a real
server whose upstream is the fake one. Every test also checks that the browser logged no error or CSP violation.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import Server, server_env, start_server, stop_server
from fake_upstream import FakeUpstream
from fastapi.testclient import TestClient
from playwright.sync_api import expect

from server.app import create_app


@pytest.fixture(scope="module")
def page_server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server as the README starts it, with the cache off: a repeated request is a new generation."""
    tmp = tmp_path_factory.mktemp("page-server")
    srv = start_server(tmp, server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_CACHE_BYTES="0"))
    yield srv
    stop_server(srv)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def open_page(page, server: Server):
    page.goto(server.url + "/")
    expect(page.locator("#model option").first).to_be_attached()
    return page


@pytest.mark.parametrize("path", ["/", "/static/page.js", "/static/page.css", "/docs", "/docs/swagger-ui-bundle.js"])
def test_page_and_docs_are_served_with_a_strict_csp_and_etags(page_server, path):
    status, headers, body = get(page_server.url + path)
    assert status == 200 and body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    status, again, body = get(page_server.url + path, {"If-None-Match": headers["etag"]})
    assert (status, body, again["etag"]) == (304, b"", headers["etag"])


def test_documents_load_nothing_from_other_hosts(page_server):
    for path in ("/", "/docs"):
        _, _, body = get(page_server.url + path)
        assert b"http://" not in body and b"https://" not in body, path


def test_unknown_static_files_are_404(page_server):
    assert get(page_server.url + "/static/../pyproject.toml")[0] == 404
    assert get(page_server.url + "/static/nothing.js")[0] == 404


def test_the_page_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_UI", "false")
    client = TestClient(create_app(), base_url="http://localhost")  # a Host the server answers to
    assert client.get("/").status_code == 404
    assert client.get("/static/page.js").status_code == 404
    assert client.get("/docs").status_code == 200  # the API docs stay


def test_api_docs_work_offline(page, page_server):
    page.goto(page_server.url + "/docs")
    page.locator(".swagger-ui .info .title").wait_for()
    page.locator(".opblock").first.wait_for()


def test_the_models_picker_lists_the_servers_models(page, page_server):
    _, _, body = get(page_server.url + "/v1/models")
    models = [m["id"] for m in json.loads(body)["data"]]
    open_page(page, page_server)
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models
