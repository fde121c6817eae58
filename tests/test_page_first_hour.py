"""
The web page as a newcomer meets it on a phone (390x844), in headless Chromium (tests/browser.py), against the server
as serve.sh runs it (jobs) on the fake upstream with no token: what Generate brings into view, what a failure says,
what the server keeps, and that the form, the history and its deletions behave as an image tool's do.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from browser import screenshot
from conftest import Server, running, server_env, wait_for
from fake_upstream import Fault
from jobs_client import durable_env
from playwright.sync_api import expect

PHONE = {"width": 390, "height": 844}
NO_TOKEN = "the upstream refused the request: the server has no Hugging Face token"


@pytest.fixture(scope="module")
def phone_server(upstream, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("phone")
    env = server_env(
        **durable_env(), IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images")
    )
    del env["HF_TOKEN"]
    with running(tmp, env) as server:
        server.images = tmp / "images"  # the image store's folder
        yield server


def in_viewport(page, selector: str) -> bool:
    """Whether the element is shown whole within the window as it is scrolled now."""
    return page.eval_on_selector(
        selector,
        "e => { const r = e.getBoundingClientRect();"
        " return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0"
        " && r.right <= window.innerWidth; }",
    )


def open_phone(page, server: Server) -> None:
    page.set_viewport_size(PHONE)
    page.goto(server.url + "/")
    expect(page.locator("#model option").first).to_be_attached()


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_on_a_phone_generate_brings_progress_then_the_image_into_view(page, phone_server, fresh_upstream):
    fresh_upstream.latency = 2.0  # long enough to see the progress
    open_phone(page, phone_server)
    page.fill("#prompt", "A lighthouse on a phone")
    assert page.evaluate("window.scrollY") == 0
    assert not in_viewport(page, "#results")  # the result area starts below the form, out of view
    with page.expect_response("**/image_generation/run-durable"):
        page.click("#generate")
    assert wait_for(lambda: in_viewport(page, "#progress") and in_viewport(page, "figure.pending .placeholder"))
    expect(page.locator("#status")).to_contain_text("Sent to the model")
    assert in_viewport(page, "#status")
    screenshot(page, "phone-progress-390x844.png")

    image = page.locator("figure.result img")
    image.wait_for()
    assert wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth > 0"))
    assert wait_for(lambda: in_viewport(page, "figure.result img"))  # no scrolling by hand in between
    screenshot(page, "phone-result-390x844.png")


def test_after_the_page_has_its_image_the_server_no_longer_holds_it(page, phone_server, fresh_upstream):
    open_phone(page, phone_server)
    page.fill("#prompt", "A lighthouse the server forgets")
    page.fill("#width", "64")
    page.fill("#height", "64")
    with page.expect_response(lambda r: "/images/" in r.url and r.request.method == "GET") as fetched:
        page.click("#generate")
    url = fetched.value.url
    expect(page.locator("figure.result img")).to_have_count(1)
    assert wait_for(lambda: status_of(url) == 404)
    assert [p.name for p in phone_server.images.iterdir() if not p.name.startswith(".")] == []


def test_a_failed_job_shows_why_and_what_to_do(page, browser_log, phone_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=401))
    open_phone(page, phone_server)
    page.fill("#prompt", "A lighthouse without a token")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_contain_text(NO_TOKEN)
    expect(error).to_contain_text("Make calls to Inference Providers")
    assert wait_for(lambda: in_viewport(page, "#error"))  # it is scrolled into view
    expect(page.locator("#generate")).to_have_text("Generate")
    screenshot(page, "phone-failed-390x844.png")


def test_the_form_survives_a_reload_and_history_shows_prompts(page, phone_server, fresh_upstream):
    open_phone(page, phone_server)
    page.fill("#prompt", "A lighthouse to keep")
    page.fill("#negative_prompt", "fog")
    page.select_option("#preset", "768x1024")
    page.select_option("#n", "2")
    page.click("#generate")
    expect(page.locator("#history li")).to_have_count(2)
    page.reload()
    expect(page.locator("#history li")).to_have_count(2)
    assert page.input_value("#prompt") == "A lighthouse to keep"
    assert page.input_value("#negative_prompt") == "fog"
    assert (page.input_value("#width"), page.input_value("#height"), page.input_value("#n")) == ("768", "1024", "2")
    assert page.locator("#history .prompt").all_inner_texts() == ["A lighthouse to keep"] * 2

    page.fill("#prompt", "something else")
    page.locator("#history .restore").first.click()  # a larger view, with Download and "Use these settings"
    expect(page.locator("figure.result img")).to_have_count(1)
    assert wait_for(lambda: in_viewport(page, "figure.result img"))
    expect(page.locator("figure.result a.download")).to_be_visible()
    assert page.input_value("#prompt") == "something else"  # opening does not touch the form
    page.click("figure.result .reuse")
    assert page.input_value("#prompt") == "A lighthouse to keep"
    page.reload()
    assert page.input_value("#prompt") == "A lighthouse to keep"


def test_deleting_can_be_undone_from_the_keyboard(page, phone_server, fresh_upstream):
    open_phone(page, phone_server)
    page.fill("#prompt", "A lighthouse to delete")
    page.click("#generate")
    expect(page.locator("#history li")).to_have_count(1)
    seed = page.locator("#history .restore").get_attribute("aria-label")

    page.focus("#history .delete")
    page.keyboard.press("Enter")
    expect(page.locator("#history li")).to_have_count(0)
    expect(page.locator("#undo")).to_be_visible()
    expect(page.locator("#undo-button")).to_be_focused()  # nothing left to focus in the history
    page.keyboard.press("Enter")
    expect(page.locator("#history li")).to_have_count(1)
    assert page.locator("#history .restore").get_attribute("aria-label") == seed
    page.reload()
    expect(page.locator("#history li")).to_have_count(1)  # the undo was stored, not only drawn

    page.click("#clear-history")  # no confirm(): it can be undone
    expect(page.locator("#history li")).to_have_count(0)
    page.click("#undo-button")
    expect(page.locator("#history li")).to_have_count(1)
    page.click("#clear-history")
    expect(page.locator("#undo")).to_be_visible()
    page.reload()
    expect(page.locator("#clear-history")).to_be_disabled()
    assert page.evaluate("JSON.parse(localStorage.getItem('image-generation-form')).prompt") == (
        "A lighthouse to delete"
    )
    assert json.loads(page.evaluate("JSON.stringify(Object.keys(localStorage))")) == ["image-generation-form"]
