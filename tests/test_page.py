"""
The web page at `/`, driven the way a person uses it, in a real headless chromium (tests/browser.py), against a real
server whose upstream is the fake one. Every test also checks that the browser logged no error or CSP violation.
"""

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from browser import screenshot
from conftest import Server, server_env, start_server, stop_server, wait_for
from fake_upstream import FakeUpstream, Fault
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import expect

from image_generation_server.app import create_app


def serve(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory, **settings: str) -> Iterator[Server]:
    """The server as the README starts it, on the fake upstream, with these settings, for one test module."""
    srv = start_server(
        tmp_path_factory.mktemp("page-server"), server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, **settings)
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def page_server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The cache is off: a repeated request is a new generation."""
    yield from serve(upstream, tmp_path_factory, IMAGE_GENERATION_CACHE_BYTES="0")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


GENERATIONS = "**/v1/images/generations"


def open_page(page, server: Server):
    page.goto(server.url + "/")
    expect(page.locator("#model option").first).to_be_attached()
    return page


def response_json(response_info) -> dict:
    return response_info.value.json()


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
    expect(page.locator("#model option")).to_have_text(models)  # once the page has asked for them
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == models


def test_generate_shows_the_image_and_history_survives_a_reload(page, browser_log, page_server, fresh_upstream):
    open_page(page, page_server)
    page.keyboard.type("A lighthouse at dusk")  # the prompt has the focus
    page.select_option("#preset", "512x512")
    page.fill("#height", "384")
    page.focus("#prompt")
    with page.expect_response(GENERATIONS) as answer:
        page.keyboard.press("Control+Enter")
    sent = response_json(answer)
    shown = page.locator("figure.result img").first
    shown.wait_for()
    assert wait_for(lambda: shown.evaluate("i => i.complete && i.naturalWidth > 0"))
    size = shown.evaluate("i => [i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight]")
    assert size == [512, 384, 512, 384]  # at its natural size
    assert page.locator("figure.result .seed").first.inner_text() == str(sent["data"][0]["seed"])
    screenshot(page, "page-1280x800.png")
    page.emulate_media(color_scheme="dark")
    screenshot(page, "page-dark-1280x800.png")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "page-390x844.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
    page.set_viewport_size({"width": 360, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth") <= 360

    page.reload()
    thumbnail = page.locator("#history .restore").first
    thumbnail.wait_for()
    assert page.input_value("#prompt") == "A lighthouse at dusk"  # the last form survives a reload
    page.fill("#prompt", "")
    thumbnail.click()
    page.click("figure.result .reuse")
    assert page.input_value("#prompt") == "A lighthouse at dusk"
    assert (page.input_value("#width"), page.input_value("#height")) == ("512", "384")
    assert page.input_value("#seed") == str(sent["data"][0]["seed"])
    assert page.input_value("#seed-mode") == "keep"
    page.select_option("#seed-mode", "random")
    page.click("figure.result .reuse-seed")
    assert (page.input_value("#seed-mode"), page.input_value("#seed")) == ("keep", str(sent["data"][0]["seed"]))

    page.on("dialog", lambda dialog: dialog.accept())  # "Delete every image?"
    page.click("#history .delete")
    expect(page.locator("#history li")).to_have_count(0)
    page.keyboard.press("Control+Enter")
    expect(page.locator("#history li")).to_have_count(1)
    page.click("#clear-history")
    expect(page.locator("#history li")).to_have_count(0)
    page.reload()
    expect(page.locator("#clear-history")).to_be_disabled()
    assert page.locator("#history li").count() == 0
    browser_log.assert_clean()


def test_a_refused_request_shows_the_servers_message_at_its_field(page, browser_log, page_server, fresh_upstream):
    open_page(page, page_server)
    page.fill("#prompt", "A lighthouse at dusk")
    page.fill("#width", "100")  # not a multiple of 8
    with page.expect_response(GENERATIONS) as answer:
        page.click("#generate")
    refused = answer.value
    assert refused.status in (400, 422)
    browser_log.allow_failed_request(refused.status)
    message = refused.json()["error"]["message"]
    page.locator("#size-error").wait_for()
    assert page.inner_text("#size-error") == message
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert fresh_upstream.requests == []


def test_cancel_drops_the_upstream_call(page, browser_log, page_server, fresh_upstream):
    fresh_upstream.latency = 60
    open_page(page, page_server)
    page.fill("#prompt", "A slow lighthouse")
    page.click("#generate")
    assert wait_for(lambda: len(fresh_upstream.requests) == 1, timeout=30), "the request never reached the upstream"
    assert page.inner_text("#generate") == "Cancel"
    page.click("#generate")
    assert wait_for(lambda: fresh_upstream.abandoned == 1, timeout=30), "the upstream never saw the hang-up"
    assert page.inner_text("#status") == "Cancelled"
    assert page.inner_text("#generate") == "Generate"


def test_busy_upstream_counts_down_from_retry_after(page, browser_log, page_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "30"}))
    open_page(page, page_server)
    page.fill("#prompt", "A busy lighthouse")
    with page.expect_response(GENERATIONS) as answer:
        page.click("#generate")
    browser_log.allow_failed_request(answer.value.status)
    assert answer.value.status == 429
    expect(page.locator("#generate")).to_have_text(re.compile(r"^Retry in \d+ s$"))
    assert page.is_disabled("#generate")
    message = answer.value.json()["error"]["message"]
    assert page.inner_text("#error") == f"{message}. Generate comes back when the countdown ends."


def test_copy_as_curl_reproduces_the_same_bytes(page, page_server, fresh_upstream, tmp_path):
    open_page(page, page_server)
    page.fill("#prompt", "A lighthouse, 'quoted' at dusk")
    page.fill("#width", "320")
    page.fill("#height", "256")
    page.select_option("#seed-mode", "keep")
    page.fill("#seed", "4242")
    page.select_option("#output_format", "webp")
    with page.expect_response(GENERATIONS) as answer:
        page.click("#generate")
    image = base64.b64decode(response_json(answer)["data"][0]["b64_json"])
    page.click("figure.result .copy-curl")
    command = page.inner_text("figure.result pre.curl")

    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=60, capture_output=True)
    written = tmp_path / "image-4242.webp"
    assert written.read_bytes() == image
    assert Image.open(written).size == (320, 256)
    assert len(fresh_upstream.requests) == 2  # generated twice: a reproduction, not a cached copy


@pytest.fixture(scope="module")
def keyed_server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that asks for an API key."""
    yield from serve(upstream, tmp_path_factory, IMAGE_GENERATION_API_KEYS="page-key")


def test_a_401_asks_for_the_api_key_and_keeps_it_in_the_tab(page, browser_log, keyed_server, fresh_upstream):
    browser_log.allow_failed_request(401)  # the model list and the first try, before the key is given
    page.goto(keyed_server.url + "/")
    page.fill("#prompt", "A guarded lighthouse")
    page.select_option("#n", "2")
    page.click("#generate")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#api-key", "page-key")
    with page.expect_response(GENERATIONS) as answer:
        page.click("#key-dialog button[type=submit]")
    assert answer.value.request.header_value("authorization") == "Bearer page-key"
    expect(page.locator("figure.result img")).to_have_count(2)
    shown = page.locator("figure.result .seed").all_inner_texts()
    assert shown == [str(image["seed"]) for image in answer.value.json()["data"]]
    assert page.evaluate("[sessionStorage.length, Object.keys(localStorage)]") == [1, ["image-generation-form"]]
    assert "page-key" not in page.evaluate("JSON.stringify(localStorage)")  # the key stays in the tab
    page.click("figure.result .copy-curl >> nth=0")
    command = page.inner_text("figure.result pre.curl >> nth=0")
    assert "page-key" not in command and "$IMAGE_GENERATION_API_KEY" in command


def test_the_browser_fixture_refuses_and_reports_other_hosts(page, browser_log):
    page.goto("about:blank")
    page.evaluate("fetch('http://192.0.2.1/cdn.js').catch(() => null)")
    assert wait_for(lambda: page.evaluate("1") and browser_log.offsite == ["http://192.0.2.1/cdn.js"])
    browser_log.offsite.clear()
    browser_log.errors.clear()  # the refused fetch's console error
