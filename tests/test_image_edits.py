"""
Editing through a real server, on both backends: `POST /v1/images/edits` driven by the official `openai` SDK, the
native `/image_editing/run` (multipart, the image bytes back) and its JSON variant, and hostile uploads.

The API backend edits through the fake upstream (which speaks the image-to-image protocol); the local backend on the
tiny random-weight model, 64x64, 2 steps. Outside the mask, the decoded answer equals the decoded input.
"""

import base64
import email.policy
import io
import json
import sys
import urllib.request
import zipfile
from email.parser import BytesParser
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import ROOT, running, server_env
from fake_upstream import render
from jobs_client import SSE, call, durable_env, wait_status
from PIL import Image
from playwright.sync_api import expect
from test_image_input import png_header_only
from test_mcp import session_call

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

KEY = "edits-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIZE = (64, 64)
SOURCE_PNG = render("a source picture", 1, *SIZE, "png")
SOURCE = Image.open(io.BytesIO(SOURCE_PNG)).convert("RGB")


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def hole_mask(size: tuple[int, int] = SIZE) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 40))
    return mask


MASK_PNG = encoded(hole_mask())


def assert_kept_outside(data: bytes, source: Image.Image = SOURCE, mask: Image.Image | None = None) -> None:
    """Decode both and compare every pixel outside the mask; the box inside it changed."""
    kept = np.asarray(mask or hole_mask())[:, :, 3] != 0
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    src = np.asarray(source, dtype=np.int16)
    assert out.shape == src.shape
    assert (out[kept] == src[kept]).all()
    assert np.abs(out[~kept] - src[~kept]).mean() > 1


@pytest.fixture(scope="module")
def api_server(upstream, tmp_path_factory):
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_API_KEYS=KEY)
    with running(tmp_path_factory.mktemp("edits-api"), env) as server:
        yield server


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    model = build(tmp_path_factory.mktemp("models") / "tiny-sd")
    env = server_env(
        IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(model), IMAGE_GENERATION_API_KEYS=KEY
    )
    with running(tmp_path_factory.mktemp("edits-local"), env, timeout=120) as server:
        yield server


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.mark.parametrize("backend", ["api_server", "local_server"])
@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_sdk_edit_with_a_mask_on_both_backends(request, backend, response_format, fresh_upstream):
    server = request.getfixturevalue(backend)
    steps = {"num_inference_steps": 2} if backend == "local_server" else {}
    with sdk(server) as client:
        result = client.images.edit(
            image=("source.png", SOURCE_PNG, "image/png"), mask=("mask.png", MASK_PNG, "image/png"),
            prompt="a red hat", n=2, size="64x64", response_format=response_format, extra_body=steps,
        )  # fmt: skip
        assert (len(result.data), result.size) == (2, "64x64")
        answers = [
            base64.b64decode(item.b64_json) if response_format == "b64_json" else fetch(item.url)
            for item in result.data
        ]
        seeds = [item.model_extra["seed"] for item in result.data]
        assert seeds[1] == seeds[0] + 1 and answers[0] != answers[1]
        for data, seed in zip(answers, seeds, strict=True):
            assert Image.open(io.BytesIO(data)).size == SIZE
            assert_kept_outside(data)
            alone = client.images.edit(
                image=("source.png", SOURCE_PNG, "image/png"), mask=("mask.png", MASK_PNG, "image/png"),
                prompt="a red hat", size="64x64", extra_body={"seed": seed, **steps},
            ).data[0]  # fmt: skip
            assert base64.b64decode(alone.b64_json) == data  # each image is its seed's alone
    if backend == "api_server":
        assert {seen.payload["parameters"]["target_size"]["width"] for seen in fresh_upstream.requests} == {64}


def test_sdk_edit_without_a_mask_at_another_size(api_server, fresh_upstream):
    with sdk(api_server) as client:
        result = client.images.edit(
            image=("source.jpg", encoded(SOURCE, "JPEG"), "image/jpeg"), prompt="a red hat", size="128x96",
            output_format="webp", output_compression=70, extra_body={"seed": 3, "strength": 0.4},
        )  # fmt: skip
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert (image.format, image.size) == ("WEBP", (128, 96))
    [seen] = fresh_upstream.requests
    assert (seen.payload["parameters"]["strength"], seen.payload["parameters"]["seed"]) == (0.4, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"image": [("a.png", SOURCE_PNG), ("b.png", SOURCE_PNG)]}, "one image per edit"),
        ({"extra_body": {"input_fidelity": "high"}}, "input_fidelity is not offered; set strength instead"),
        ({"extra_body": {"quality": "hd"}}, "quality='hd' is not offered"),
        ({"extra_body": {"strength": "2"}}, "strength must be a number in 0..1"),
        ({"extra_body": {"markup": "x"}}, "unknown field 'markup'"),
        ({"size": "100x64"}, "width=100 must be a multiple of 8"),
    ],
)
def test_settings_that_cannot_be_honoured_are_400s(api_server, fresh_upstream, call, message):
    arguments = {"image": ("source.png", SOURCE_PNG, "image/png"), "prompt": "a red hat", **call}
    with sdk(api_server) as client, pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(**arguments)
    assert message in raised.value.body["message"]
    assert fresh_upstream.requests == []


def polyglot() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.txt", "not an image")
    return SOURCE_PNG + archive.getvalue()


def rss(server) -> int:
    """The server process's resident memory, in bytes."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.parametrize(
    ("image", "mask", "status", "message"),
    [
        (png_header_only(50_000, 50_000), None, 400, "image declares more than"),
        (encoded(SOURCE, "JPEG")[:-200], None, 400, "image is a truncated JPEG"),
        (SOURCE_PNG, encoded(hole_mask((32, 32))), 400, "mask is 32x32; it must be the image's size, 64x64"),
        (SOURCE_PNG, encoded(SOURCE), 400, "mask has no alpha channel"),
        (polyglot(), None, 400, "image has data after the end of its PNG image"),
        (b"GIF89a" + b"\0" * 64, None, 400, "image must be a PNG, JPEG or WebP file"),
    ],
)
def test_hostile_uploads_are_short_4xx_with_nothing_sent_upstream(api_server, fresh_upstream, image, mask, status,
                                                                   message):  # fmt: skip
    files = [("image", ("upload.png", image, "image/png"))]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    before = rss(api_server)
    response = httpx.post(
        f"{api_server.url}/v1/images/edits", files=files, data={"prompt": "a hat"},
        headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and len(error["message"]) < 120
    assert fresh_upstream.requests == []
    assert rss(api_server) - before < 32 * 1024 * 1024  # nothing the size of the declared image was decoded


def test_a_body_over_the_upload_cap_is_a_413_before_it_is_read(api_server, fresh_upstream):
    body = b"x" * (60 * 1024 * 1024)
    response = httpx.post(
        f"{api_server.url}/v1/images/edits", content=body, timeout=60,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=x"},
    )  # fmt: skip
    assert response.status_code == 413
    assert response.json()["error"]["message"] == f"the request body is over {20 * 1024 * 1024} bytes"
    assert fresh_upstream.requests == []


def test_native_route_answers_the_edited_image(api_server, fresh_upstream):
    response = httpx.post(
        f"{api_server.url}/image_editing/run",
        files=[("files", ("a.png", SOURCE_PNG, "image/png")), ("files", ("m.png", MASK_PNG, "image/png"))],
        data={"prompt": "a red hat", "seed": "9", "strength": "0.5"},
        headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert (response.headers["content-type"], response.headers["x-seed"]) == ("image/png", "9")
    assert_kept_outside(response.content)
    # The JSON variant (served/image_editing_json/, a wrapper) runs the same pipeline on base64 images.
    response = httpx.post(
        f"{api_server.url}/image_editing_json/run",
        json={"image": {"base64_image": base64.b64encode(SOURCE_PNG).decode()}, "prompt": "a red hat"},
        headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    [image] = response.json()["result"]["image_to_image"]["images"]
    assert Image.open(io.BytesIO(base64.b64decode(image["base64_image"]))).size == SIZE


def test_json_variant_edits_by_the_mask(api_server, fresh_upstream):
    body = {
        "image": {"base64_image": base64.b64encode(SOURCE_PNG).decode()},
        "mask": {"base64_image": base64.b64encode(MASK_PNG).decode()}, "prompt": "a red hat",
    }  # fmt: skip
    response = httpx.post(f"{api_server.url}/image_editing_json/run", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    [image] = response.json()["result"]["image_to_image"]["images"]
    assert image["meta"]["masked"] is True
    assert_kept_outside(base64.b64decode(image["base64_image"]))
    body["mask"] = {"base64_image": base64.b64encode(encoded(hole_mask((32, 32)))).decode()}
    response = httpx.post(f"{api_server.url}/image_editing_json/run", json=body, headers=AUTH, timeout=30)
    assert (response.status_code, response.json()) == (
        422,
        {"detail": "mask is 32x32; it must be the image's size, 64x64"},
    )
    assert len(fresh_upstream.requests) == 1


def test_native_route_refuses_a_bad_upload_with_a_422(api_server, fresh_upstream):
    response = httpx.post(
        f"{api_server.url}/image_editing/run", files=[("files", ("a.png", SOURCE_PNG[:-30], "image/png"))],
        data={"prompt": "a red hat"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
    )  # fmt: skip
    assert (response.status_code, response.json()) == (422, {"detail": "image is a truncated PNG"})
    assert fresh_upstream.requests == []


def test_edit_routes_need_the_api_key(api_server):
    for path in ("/v1/images/edits", "/image_editing/run", "/image_editing_json/run"):
        assert httpx.post(f"{api_server.url}{path}", content=b"{}").status_code == 401


def test_openapi_documents_the_edit_form(api_server):
    schema = json.loads(fetch(f"{api_server.url}/openapi.json"))
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "strength", "n", "size"} <= set(form["properties"])
    # the JSON variant's image and mask say what they are, as the form's do
    body = schema["components"]["schemas"]["image_editing_jsonRunRequest"]["properties"]
    assert form["properties"]["mask"]["description"] in body["mask"]["description"]
    assert "base64_image" in body["image"]["description"]


async def test_mcp_edit_image_with_base64_and_a_mask(api_server, fresh_upstream):
    arguments = {
        "image": base64.b64encode(SOURCE_PNG).decode(), "mask": base64.b64encode(MASK_PNG).decode(),
        "prompt": "a red hat", "n": 2, "seed": 4, "strength": 0.7,
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    result = await session_call(api_server, lambda session: session.call_tool("edit_image", arguments), headers)
    assert not result.isError, result.content
    images = [block for block in result.content if block.type == "image"]
    assert len(images) == 2 and result.content[-1].text.startswith("seed 4, 5; size 64x64")
    for image in images:
        assert_kept_outside(base64.b64decode(image.data))
    assert {seen.payload["parameters"]["strength"] for seen in fresh_upstream.requests} == {0.7}


async def test_mcp_edit_image_takes_this_servers_image_urls_only(api_server, fresh_upstream):
    with sdk(api_server) as client:
        url = client.images.generate(prompt="a boat", size="64x64", response_format="url").data[0].url
    headers = {"Authorization": f"Bearer {KEY}"}
    fresh_upstream.requests.clear()

    async def edit(image: str) -> object:
        arguments = {"image": image, "prompt": "a red sail"}
        return await session_call(api_server, lambda session: session.call_tool("edit_image", arguments), headers)

    result = await edit(url)
    assert not result.isError, result.content
    assert len(fresh_upstream.requests) == 1  # the edit; the image was read from the store, not fetched
    name = url.rsplit("/", 1)[1]
    for elsewhere in (
        f"{fresh_upstream.url}/images/{name}",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ):
        result = await edit(elsewhere)
        assert result.isError
        assert "image" in result.content[0].text and len(result.content[0].text) < 120
    assert len(fresh_upstream.requests) == 1  # nothing fetched, nothing edited


EDITS = "/image_editing"


@pytest.fixture(scope="module")
def edit_jobs_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit-jobs")
    env = server_env(
        **durable_env(), IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(build(tmp / "tiny-sd")),
        IMAGE_GENERATION_CACHE_BYTES="0", IMAGE_GENERATION_API_KEYS=KEY, IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images"),
    )  # fmt: skip
    with running(tmp, env, timeout=120) as server:
        yield server


def submit_edit(server, body: dict) -> dict:
    status, _, data = call(f"{server.url}{EDITS}/run-durable", "POST", body, AUTH)
    assert status == 202, (status, data)
    return json.loads(data)


def test_an_edit_job_reports_its_steps_and_stores_the_edit(edit_jobs_server):
    base = edit_jobs_server.url
    image, mask = base64.b64encode(SOURCE_PNG).decode(), base64.b64encode(MASK_PNG).decode()
    accepted = submit_edit(
        edit_jobs_server,
        {"image": image, "mask": mask, "prompt": "a hat", "num_inference_steps": 4, "partial_images": 2},
    )
    stream = SSE(f"{base}{accepted['links']['stream']}", AUTH)
    events = list(stream)
    stream.close()
    steps = [e.data["payload"]["step"] for e in events if e.event == "chunk" and e.data["payload"]["phase"] == "step"]
    assert steps == [1, 2, 3]  # strength 0.8 of 4 steps
    previews = [e.data["payload"] for e in events if e.event == "chunk" and e.data["payload"]["phase"] == "preview"]
    assert [(p["index"], p["step"], p["steps"]) for p in previews] == [(0, 1, 3), (1, 2, 3)]  # the edit as it goes
    [edited] = events[-1].data["result"]["images"]
    status, _, data = call(f"{base}{edited['url']}")
    assert status == 200
    assert_kept_outside(data)
    # A stored image is an edit job's input by its path: read from the store, never fetched.
    again = submit_edit(edit_jobs_server, {"image": edited["url"], "prompt": "a blue hat", "num_inference_steps": 2})
    done = wait_status(base, again["execution_id"], {"completed", "failed"}, headers=AUTH, jobs=EDITS)
    assert done["status"] == "completed", done


def test_an_edit_job_is_cancelled_at_its_next_step(edit_jobs_server):
    base = edit_jobs_server.url
    body = {"image": base64.b64encode(SOURCE_PNG).decode(), "prompt": "a hat", "num_inference_steps": 150}
    accepted = submit_edit(edit_jobs_server, body)
    stream = SSE(f"{base}{accepted['links']['stream']}", AUTH)
    for event in stream:
        if event.event == "chunk" and event.data["payload"]["phase"] == "step" and event.data["payload"]["step"] >= 2:
            break
    assert call(f"{base}{accepted['links']['cancel']}", "POST", headers=AUTH)[0] in (200, 202)
    finished = wait_status(
        base, accepted["execution_id"], {"canceled", "completed", "failed"}, headers=AUTH, jobs=EDITS
    )
    stream.close()
    assert finished["status"] == "canceled"
    assert [p for p in finished["progress"] if p["kind"] == "step"][-1]["metadata"]["step"] < 120


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"image": "http://169.254.169.254/latest/meta-data"}, "a URL must be one of this server's images"),
        ({"image": "/images/" + "0" * 32 + ".png"}, "no such image in this server's store"),
        ({"image": base64.b64encode(SOURCE_PNG[:-20]).decode()}, "image is a truncated PNG"),
    ],
)
def test_an_edit_job_with_a_bad_image_is_refused_at_submission(edit_jobs_server, body, message):
    status, _, data = call(f"{edit_jobs_server.url}{EDITS}/run-durable", "POST", {"prompt": "a hat", **body}, AUTH)
    assert status == 422 and message in data.decode()


@pytest.fixture(scope="module")
def page_server(upstream, tmp_path_factory):
    with running(tmp_path_factory.mktemp("edit-page"), server_env(IMAGE_GENERATION_ENDPOINT=upstream.url)) as server:
        yield server


def form_parts(content_type: str, body: bytes) -> dict[str, bytes]:
    """The parts of a multipart/form-data body, by name."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


def test_the_page_sends_the_mask_that_was_painted(page_server, fresh_upstream, page):
    page.goto(page_server.url + "/")
    expect(page.locator("#model option").first).to_be_attached()
    page.set_input_files("#edit-upload", files=[{"name": "mine.png", "mimeType": "image/png", "buffer": SOURCE_PNG}])
    expect(page.locator("#edit-dialog")).to_be_visible()
    box = page.locator("#edit-mask").bounding_box()
    scale = box["width"] / SIZE[0]  # the 64x64 image is shown larger

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x * scale, box["y"] + y * scale

    page.mouse.move(*at(16, 32))  # a brush stroke (16 px wide) from (16, 32) to (48, 32)
    page.mouse.down()
    page.mouse.move(*at(48, 32), steps=8)
    page.mouse.up()
    page.check('input[name="tool"][value="eraser"]')
    page.mouse.move(*at(44, 32))  # the eraser takes back a dab at its end
    page.mouse.down()
    page.mouse.up()
    page.fill("#edit-prompt", "a red hat")
    with page.expect_request("**/v1/images/edits") as sent, page.expect_response("**/v1/images/edits") as answered:
        page.click("#edit-apply")
    assert answered.value.status == 200, answered.value.text()
    parts = form_parts(sent.value.headers["content-type"], sent.value.post_data_buffer)
    assert parts["image"] == SOURCE_PNG and parts["prompt"] == b"a red hat" and parts["strength"] == b"0.8"
    alpha = np.asarray(Image.open(io.BytesIO(parts["mask"])).convert("RGBA"))[:, :, 3]
    assert alpha.shape == SIZE
    painted = alpha == 0
    assert painted[32, 20] and painted[28, 30] and painted[36, 12]  # under the stroke (x 8..56, y 24..40)
    assert not painted[32, 44] and not painted[32, 50]  # erased
    assert not painted[5, 5] and not painted[50, 32] and not painted[20, 32]  # never painted
    assert (alpha[~painted] == 255).all()  # the rest is fully opaque: kept
    edited = base64.b64decode(answered.value.json()["data"][0]["b64_json"])
    assert_kept_outside(edited, mask=Image.open(io.BytesIO(parts["mask"])).convert("RGBA"))
    # The edit is shown and kept in the history with its source.
    expect(page.locator("#results figure img.source")).to_be_visible()
    expect(page.locator("#history li")).to_have_count(1)
    page.locator("#history .restore").first.click()
    expect(page.locator("#results figcaption")).to_contain_text("masked edit (strength 0.8)")
    # "Edit" on a result opens the editor on that image, the mask cleared.
    page.click("#results .edit")
    expect(page.locator("#edit-dialog")).to_be_visible()
    assert page.input_value("#edit-prompt") == "a red hat"
    page.click("#edit-cancel")
    expect(page.locator("#edit-dialog")).to_be_hidden()
