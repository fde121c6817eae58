"""
The web page on a server that runs jobs (durable mode) with the tiny local model: the page submits a job, shows each
denoising step as the job's stream reports it, and Cancel cancels the job. Browser fixtures: tests/browser.py.
"""

import json
import re
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import ROOT, Server, running, server_env, wait_for
from jobs_client import durable_env
from playwright.sync_api import expect

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build


@pytest.fixture(scope="module")
def jobs_page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = build(tmp_path_factory.mktemp("models") / "tiny-sd")
    env = server_env(**durable_env(), IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(model))
    with running(tmp_path_factory.mktemp("jobs-page"), env, timeout=180) as srv:
        yield srv


def submit(page, server: Server, steps: int, size: int) -> str:
    """Fill the form and press Generate; returns the job's URL path."""
    page.goto(server.url + "/")
    page.fill("#prompt", "A lighthouse, step by step")
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#steps", str(steps))
    with page.expect_response("**/image_generation/run-durable") as submitted:
        page.click("#generate")
    assert submitted.value.status == 202, submitted.value.text()
    return submitted.value.header_value("location")


def test_a_job_shows_each_step_then_the_image(page, jobs_page_server):
    submit(page, jobs_page_server, steps=150, size=128)  # long enough (seconds) for the page to show steps live
    expect(page.locator("#status")).to_contain_text(re.compile(r"Step \d+ of 150"))
    expect(page.locator("#progress")).to_be_visible()
    image = page.locator("figure.result img")
    image.wait_for()
    assert wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth") == 128, timeout=120)
    expect(page.locator("#progress")).to_be_hidden()


def test_cancel_cancels_the_job(page, jobs_page_server):
    job = submit(page, jobs_page_server, steps=150, size=128)
    expect(page.locator("#status")).to_contain_text("Step")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("Cancelled")

    def status() -> str:
        with urllib.request.urlopen(jobs_page_server.url + job, timeout=10) as r:
            return json.load(r)["status"]

    assert wait_for(lambda: status() == "canceled", timeout=60)
    assert page.locator("figure.result").count() == 0


# Records each preview the page draws (its pixels and caption) as it appears, and whether the final image was there.
WATCH_PREVIEWS = """() => {
  window.previewsSeen = [];
  const seen = new Set();
  new MutationObserver(() => {
    const image = document.querySelector("#results img.preview");
    if (!image || !image.src || seen.has(image.src)) return;
    seen.add(image.src);
    const entry = { step: document.querySelector("#results .preview-step").textContent,
                    final: Boolean(document.querySelector("figure.result")) };
    window.previewsSeen.push(entry);
    const copy = new Image();  // its pixels, read through a canvas (the page's CSP lets nothing fetch a blob: URL)
    copy.src = image.src;
    copy.decode().then(() => {
      const canvas = Object.assign(document.createElement("canvas"), { width: copy.width, height: copy.height });
      canvas.getContext("2d").drawImage(copy, 0, 0);
      entry.pixels = Array.from(canvas.getContext("2d").getImageData(0, 0, copy.width, copy.height).data).join(",");
    });
  }).observe(document.getElementById("results"), { subtree: true, childList: true, attributes: true });
}"""


def test_previews_sharpen_in_the_image_area_then_the_image_replaces_them(page, jobs_page_server):
    page.goto(jobs_page_server.url + "/")
    page.evaluate(WATCH_PREVIEWS)
    page.fill("#prompt", "A lighthouse, sharpening")
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#steps", "24")  # previews at steps 6, 12 and 18
    with page.expect_response("**/image_generation/run-durable") as submitted:
        page.click("#generate")
    assert submitted.value.status == 202, submitted.value.text()
    image = page.locator("figure.result img")
    image.wait_for(timeout=180_000)
    assert wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth") == 128, timeout=120)

    seen = page.evaluate("window.previewsSeen")
    assert [entry["step"] for entry in seen] == [f"Preview at step {k} of 24" for k in (6, 12, 18)]
    assert not any(entry["final"] for entry in seen)  # all before the final image
    assert len({entry.get("pixels") for entry in seen} - {None}) >= 2  # at least two different pictures
    assert page.locator("#results img.preview").count() == 0  # the final image replaced them


def test_a_queued_job_shows_how_many_are_ahead(page, jobs_page_server):
    """Issue 22: the page says where a waiting job is in the queue ("1 ahead, about 20 s")."""
    ahead = json.dumps({"prompt": "a job ahead", "width": 64, "height": 64, "num_inference_steps": 150}).encode()
    request = urllib.request.Request(
        jobs_page_server.url + "/image_generation/run-durable", ahead, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        blocking = r.headers["Location"]
    submit(page, jobs_page_server, steps=2, size=64)
    expect(page.locator("#status")).to_contain_text(re.compile(r"^1 ahead(, about \d+ s)?…"))
    cancel = urllib.request.Request(jobs_page_server.url + blocking + "/cancel", b"", method="POST")
    urllib.request.urlopen(cancel, timeout=30).close()
    page.locator("figure.result img").wait_for(timeout=120_000)  # then it runs
