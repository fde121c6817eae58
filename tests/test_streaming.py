"""Live previews and progress through the doors, on a real server with the local backend (the tiny model)."""

import base64
import io
import sys

import httpx
import openai
import pytest
from conftest import ROOT, running, server_env, wait_for
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent, ImageGenStreamEvent
from PIL import Image
from pydantic import TypeAdapter

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

STEPS = 6
REQUEST = {"prompt": "a lighthouse at dusk", "size": "64x64"}
EXTRA = {"seed": 21, "num_inference_steps": STEPS}


@pytest.fixture(scope="module")
def local_server(tmp_path_factory):
    """The local backend on the tiny model, the seeded cache off (each request generates)."""
    model = build(tmp_path_factory.mktemp("models") / "tiny-sd")
    env = server_env(
        IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(model), IMAGE_GENERATION_CACHE_BYTES="0"
    )
    with running(tmp_path_factory.mktemp("streaming"), env, timeout=120) as server:
        yield server


@pytest.fixture
def client(local_server):
    with openai.OpenAI(base_url=f"{local_server.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def test_openai_stream_sends_partials_then_the_same_image(client):
    plain = client.images.generate(**REQUEST, extra_body=EXTRA)
    events = list(client.images.generate(**REQUEST, stream=True, partial_images=2, extra_body=EXTRA))

    parsed = [TypeAdapter(ImageGenStreamEvent).validate_python(event.model_dump()) for event in events]
    *partials, completed = parsed
    assert [type(event) for event in partials] == [ImageGenPartialImageEvent] * 2  # steps 2 and 4 of 6
    assert [event.partial_image_index for event in partials] == [0, 1]
    assert isinstance(completed, ImageGenCompletedEvent)
    assert completed.b64_json == plain.data[0].b64_json  # same seed, same bytes, streamed or not
    for event in partials:
        assert (event.size, event.output_format, event.background, event.quality) == ("64x64", "png", "opaque", "auto")
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).format == "PNG"
    assert partials[0].b64_json != partials[1].b64_json
    assert (completed.size, completed.output_format) == ("64x64", "png")
    assert events[-1].model_extra["seed"] == plain.data[0].model_extra["seed"] == EXTRA["seed"]  # our extension


def test_stream_events_are_openai_server_sent_events(local_server):
    """The wire itself: `event:` names equal to each payload's `type`, JSON data, and the content type."""
    body = {**REQUEST, **EXTRA, "stream": True, "partial_images": 1, "output_format": "webp"}
    with httpx.stream("POST", f"{local_server.url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    blocks = [block for block in text.split("\n\n") if block]
    names = [block.split("\n")[0].removeprefix("event: ") for block in blocks]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    for name, block in zip(names, blocks, strict=True):
        data = TypeAdapter(ImageGenStreamEvent).validate_json(block.split("\n")[1].removeprefix("data: "))
        assert data.type == name
        assert data.output_format == "webp"


async def mcp_call(server, arguments, progress_callback=None, tool="generate_image"):
    async with (
        httpx.AsyncClient(timeout=120) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await session.call_tool(tool, arguments, progress_callback=progress_callback)


async def test_mcp_reports_a_progress_notification_per_step_when_asked(local_server):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    arguments = {"prompt": "a kite", "width": 64, "height": 64, "seed": 5, "num_inference_steps": STEPS, "n": 2}
    result = await mcp_call(local_server, arguments, on_progress)
    assert not result.isError, result.content
    # Two images made one after another: 12 steps in all, each image's own step in the message.
    assert seen == [(k, 2 * STEPS, f"step {(k - 1) % STEPS + 1} of {STEPS}") for k in range(1, 2 * STEPS + 1)]

    plain = await mcp_call(local_server, arguments)  # no progress token: the same images
    assert [item.data for item in plain.content[:2]] == [item.data for item in result.content[:2]]


async def test_mcp_edit_image_reports_a_progress_notification_per_step_when_asked(local_server):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, total, message))

    source = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((64, 64)).save(source, format="PNG")
    arguments = {
        "image": base64.b64encode(source.getvalue()).decode(), "prompt": "a red hat", "seed": 5, "n": 2,
        "num_inference_steps": STEPS, "strength": 0.5,
    }  # fmt: skip
    result = await mcp_call(local_server, arguments, on_progress, tool="edit_image")
    assert not result.isError, result.content
    steps = int(STEPS * 0.5)  # an edit runs the last `strength` of the steps
    assert seen == [(k, 2 * steps, f"step {(k - 1) % steps + 1} of {steps}") for k in range(1, 2 * steps + 1)]

    plain = await mcp_call(local_server, arguments, tool="edit_image")  # no progress token: the same images
    assert [item.data for item in plain.content[:2]] == [item.data for item in result.content[:2]]


def test_a_client_that_leaves_the_stream_stops_the_generation(local_server, client):
    """Streams are bounded by their client: hanging up after the first partial image cancels the generation."""
    body = {**REQUEST, "seed": 31, "num_inference_steps": 150, "stream": True, "partial_images": 3}
    with httpx.stream("POST", f"{local_server.url}/v1/images/generations", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "event: image_generation.partial_image":  # the first, at step 38 of 150
                break
    assert wait_for(lambda: "Client disconnected: cancelled POST /v1/images/generations" in local_server.log(), 30)
    assert client.images.generate(**REQUEST, extra_body={"num_inference_steps": 1}).data  # the device is free
    log = local_server.log()
    assert "Seed 31: step 30/150" in log  # it was under way (a log line every 10% of the steps)...
    assert "Seed 31: step 150/150" not in log  # ...and stopped


def test_openai_edit_stream_sends_partials_then_the_same_image(client):
    source = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((64, 64)).save(source, format="PNG")
    edit = {"image": ("source.png", source.getvalue(), "image/png"), "prompt": "a red hat", "size": "64x64"}
    plain = client.images.edit(**edit, extra_body=EXTRA)
    events = list(client.images.edit(**edit, stream=True, partial_images=2, extra_body=EXTRA))

    *partials, completed = [TypeAdapter(ImageGenStreamEvent).validate_python(event.model_dump()) for event in events]
    assert [event.partial_image_index for event in partials] == [0, 1]
    assert isinstance(completed, ImageGenCompletedEvent)
    assert completed.b64_json == plain.data[0].b64_json
