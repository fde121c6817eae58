"""
A parameter a caller leaves out means the pipeline's default, at every door (issue 21's acceptance).

The served folder is copied with `width: 768`, `height: 512` and `output_format: webp` in its pipeline YAML (the
component's init parameters); no request names them. The native route, the JSON variant, `/v1/images/generations`
(official `openai` SDK), the MCP tool (official `mcp` SDK), a job and the page's initial form (Chromium) must all
give a 768x512 WebP. The fake upstream draws 512x512 when it is sent no size, so a door that drops the defaults fails.
"""

import asyncio
import base64
import io
import json
import re
import shutil

import httpx
import openai
import pytest
import yaml
from conftest import ROOT, running, server_env
from jobs_client import call, submit, wait_status
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from PIL import Image
from playwright.sync_api import expect

from components.request import BatchParameters, CommonParameters, GenerationParameters, Streaming

DEFAULTS = {"width": 768, "height": 512, "output_format": "webp"}


def served_copy(tmp_path):
    """The served folder (the wrapper's folder and the JSON variant's), with the defaults above in every pipeline."""
    served = tmp_path / "served"
    shutil.copytree(ROOT / "served", served, ignore=shutil.ignore_patterns("__pycache__"))  # links copied as files
    for path in served.rglob("*.yml"):
        pipeline = yaml.safe_load(path.read_text())
        if "text_to_image" in pipeline["components"]:  # the image pipelines (not the editing ones)
            pipeline["components"]["text_to_image"]["init_parameters"].update(DEFAULTS)
            path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return served


@pytest.fixture(scope="module")
def defaults_server(upstream, tmp_path_factory):
    """Durable mode (jobs on, in memory), as serve.sh and the container run it, serving the copy."""
    tmp = tmp_path_factory.mktemp("pipeline-defaults")
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        HAYHOOKS_DURABLE_MODE="true",
        HAYHOOKS_PIPELINES_DIR=str(served_copy(tmp)),
    )
    with running(tmp, env) as server:
        yield server


def assert_default_image(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    assert (image.size, image.format) == ((768, 512), "WEBP")


def test_the_native_route(defaults_server, fresh_upstream):
    status, headers, data = call(f"{defaults_server.url}/image_generation/run", "POST", {"prompt": "a lighthouse"})
    assert status == 200, data
    assert headers["content-type"] == "image/webp"
    assert_default_image(data)
    assert fresh_upstream.requests[0].payload["parameters"]["width"] == 768


def test_the_json_variant(defaults_server, fresh_upstream):
    status, _, data = call(f"{defaults_server.url}/image_generation_json/run", "POST", {"prompt": "a lighthouse"})
    assert status == 200, data
    [image] = json.loads(data)["result"]["text_to_image"]["images"]
    assert image["mime_type"] == "image/webp"
    assert_default_image(base64.b64decode(image["base64_image"]))


async def test_the_openai_door_without_size(defaults_server, fresh_upstream):
    async with openai.AsyncOpenAI(base_url=f"{defaults_server.url}/v1", api_key="unused", max_retries=0) as client:
        response = await client.images.generate(prompt="a lighthouse")
    assert (response.size, response.output_format) == ("768x512", "webp")
    assert_default_image(base64.b64decode(response.data[0].b64_json))


def test_the_mcp_tool(defaults_server, fresh_upstream):
    async def generate() -> types.CallToolResult:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            streamable_http_client(f"{defaults_server.url}/mcp", http_client=http) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await session.call_tool("generate_image", {"prompt": "a lighthouse"})

    result = asyncio.run(generate())
    assert not result.isError, result.content
    image = result.content[0]
    assert isinstance(image, types.ImageContent) and image.mimeType == "image/webp"
    assert_default_image(base64.b64decode(image.data))


def test_a_job(defaults_server, fresh_upstream):
    job = submit(defaults_server.url, {"prompt": "a lighthouse"})
    done = wait_status(defaults_server.url, job["execution_id"], {"completed", "failed"})
    assert done["status"] == "completed", done
    [image] = done["result"]["images"]
    assert (image["width"], image["height"], image["format"]) == (768, 512, "webp")
    status, _, data = call(defaults_server.url + image["url"])
    assert status == 200
    assert_default_image(data)


def test_every_door_publishes_the_one_request_model(defaults_server):
    """The OpenAPI bodies are the request model's fields, with its descriptions and no default of their own."""
    status, _, data = call(f"{defaults_server.url}/openapi.json")
    assert status == 200
    schema = json.loads(data)

    def body(path: str) -> dict:
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        ref = next(iter(content.values()))["schema"]["$ref"]
        return schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]

    native, job, openai_body = (
        body("/image_generation/run"),
        body("/image_generation/run-durable"),
        body("/v1/images/generations"),
    )
    assert set(native) == set(GenerationParameters.model_fields)
    assert set(BatchParameters.model_fields) <= set(job)
    assert set(job) - set(BatchParameters.model_fields) <= set(Streaming.model_fields)  # a job's previews
    assert set(CommonParameters.model_fields) | {"n", "size"} <= set(openai_body)
    assert not {"width", "height"} & set(openai_body)
    for name, field in GenerationParameters.model_fields.items():
        assert native[name]["description"] == job[name]["description"] == field.description
        assert native[name].get("default") is None  # the pipeline's default, which the YAML holds
    assert native["width"]["anyOf"][0] == {"maximum": 2048, "minimum": 64, "multipleOf": 8, "type": "integer"}


def test_the_pages_initial_form(defaults_server, fresh_upstream, page):
    """The form starts with the served pipeline's defaults, and generating from it gives that image."""
    page.goto(defaults_server.url + "/")
    expect(page.locator("#model option").first).to_be_attached()
    assert (page.input_value("#width"), page.input_value("#height")) == ("768", "512")
    assert page.input_value("#output_format") == "webp"
    page.fill("#prompt", "a lighthouse")
    # With jobs offered (durable mode), the page submits a job, downloads its image from the image store (kept here
    # on its way), then deletes it there.
    downloads: list[bytes] = []

    def keep(route) -> None:
        if route.request.method != "GET":  # the DELETE that follows
            route.continue_()
            return
        response = route.fetch()
        downloads.append(response.body())
        route.fulfill(response=response)

    page.route(re.compile(r"/images/[0-9a-f]{32}\.webp$"), keep)
    page.click("#generate")
    expect(page.locator("#results img").first).to_be_visible()
    [data] = downloads
    assert_default_image(data)
    assert page.eval_on_selector("#results img", "img => [img.naturalWidth, img.naturalHeight]") == [768, 512]
