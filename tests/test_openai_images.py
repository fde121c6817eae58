"""The OpenAI Images door through a real server, driven by the official `openai` SDK (a client we did not write)."""

import base64
import io
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import post_raw, running, server_env
from fake_upstream import Fault
from openai.types import ImageGenCompletedEvent, ImageGenStreamEvent
from PIL import Image
from pydantic import TypeAdapter

KEY = "openai-door-test-key"
SMALL = {"prompt": "a fox in the snow", "size": "64x64"}


@pytest.fixture(scope="module")
def openai_server(upstream, tmp_path_factory):
    """One server for the module: API keys on, and a 3 s deadline so that timeouts are quick to reach."""
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_TIMEOUT="3", IMAGE_GENERATION_API_KEYS=KEY
    )
    with running(tmp_path_factory.mktemp("openai"), env) as server:
        yield server


@pytest.fixture
def client(openai_server):
    with openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key=KEY, max_retries=0, timeout=30) as sdk:
        yield sdk


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_n_images_of_the_asked_size_whose_seeds_reproduce_them(client, openai_server, fresh_upstream):
    result = client.images.generate(prompt="a lighthouse at dusk", n=2, size="768x512", response_format="b64_json")

    assert len(result.data) == 2
    for item in result.data:
        image = picture(item.b64_json)
        assert (image.format, image.size) == ("PNG", (768, 512))
    assert (result.size, result.output_format) == ("768x512", "png")
    seeds = [item.model_extra["seed"] for item in result.data]
    assert seeds[1] == seeds[0] + 1
    assert result.data[0].b64_json != result.data[1].b64_json
    for item, seed in zip(result.data, seeds, strict=True):
        alone = client.images.generate(prompt="a lighthouse at dusk", size="768x512", extra_body={"seed": seed}).data[0]
        assert alone.b64_json == item.b64_json
        # The native route runs the same pipeline: the same seed gives the same bytes there.
        body = {"prompt": "a lighthouse at dusk", "width": 768, "height": 512, "seed": seed}
        request = urllib.request.Request(
            f"{openai_server.url}/image_generation/run", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as native:
            assert native.read() == base64.b64decode(item.b64_json)


def test_url_response_format_links_the_image_store(client, openai_server, fresh_upstream):
    result = client.images.generate(**SMALL, n=2, response_format="url", extra_body={"seed": 12})
    same = client.images.generate(**SMALL, n=2, extra_body={"seed": 12})
    assert [item.b64_json for item in result.data] == [None, None]
    for item, b64 in zip(result.data, [item.b64_json for item in same.data], strict=True):
        assert item.url.startswith(f"{openai_server.url}/images/")
        with urllib.request.urlopen(item.url, timeout=30) as response:  # no API key: the URL is the capability
            assert response.read() == base64.b64decode(b64)


def test_webp_and_compression(client, fresh_upstream):
    webp = client.images.generate(**SMALL, output_format="webp", extra_body={"seed": 3})
    assert webp.output_format == "webp"
    assert picture(webp.data[0].b64_json).format == "WEBP"
    smaller = client.images.generate(**SMALL, output_format="webp", output_compression=5, extra_body={"seed": 3})
    assert picture(smaller.data[0].b64_json).format == "WEBP"
    assert len(smaller.data[0].b64_json) < len(webp.data[0].b64_json)


def test_extensions_reach_the_upstream(client, fresh_upstream):
    client.images.generate(
        **SMALL,
        extra_body={"seed": 9, "negative_prompt": "fog", "num_inference_steps": 4, "guidance_scale": 2.5},
    )
    [seen] = fresh_upstream.requests
    assert seen.payload["inputs"] == "a fox in the snow"
    assert seen.payload["parameters"] == {
        "width": 64, "height": 64, "seed": 9, "negative_prompt": "fog", "num_inference_steps": 4,
        "guidance_scale": 2.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "100x100"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"size": "big"}, "size"),
        ({"n": 11}, "n"),
        ({"n": 0}, "n"),
        ({"response_format": "link"}, "response_format"),
        ({"background": "transparent"}, "background"),
        ({"quality": "hd"}, "quality"),
        ({"style": "vivid"}, "style"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),  # png has no quality setting
        ({"model": "https://attacker.example/steal"}, "model"),
        ({"extra_body": {"sed": 3}}, "sed"),
        ({"extra_body": {"seed": -1}}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"partial_images": 2}, "partial_images"),  # without stream
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "n": 2}, "n"),
        ({"stream": True, "response_format": "url"}, "response_format"),
    ],
)
def test_bad_requests_are_400_naming_the_field_and_cost_nothing_upstream(client, fresh_upstream, kwargs, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(**{**SMALL, **kwargs})
    error = raised.value.body
    assert raised.value.status_code == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert 0 < len(error["message"]) < 200
    assert fresh_upstream.requests == []


def test_a_stream_from_the_api_backend_is_the_completed_event_alone(client, fresh_upstream):
    """The Hugging Face API returns only the final image: no partial images, as OpenAI allows."""
    plain = client.images.generate(**SMALL, extra_body={"seed": 4})
    events = list(client.images.generate(**SMALL, stream=True, partial_images=2, extra_body={"seed": 4}))
    [completed] = events
    completed = TypeAdapter(ImageGenStreamEvent).validate_python(completed.model_dump())
    assert isinstance(completed, ImageGenCompletedEvent)
    assert completed.b64_json == plain.data[0].b64_json
    assert (completed.size, completed.output_format, completed.background) == ("64x64", "png", "opaque")


def test_a_stream_failing_before_any_event_is_an_ordinary_error(client, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as raised:
        list(client.images.generate(**SMALL, stream=True, partial_images=1))
    assert raised.value.response.headers["retry-after"] == "7"


def test_wrong_key_is_an_authentication_error(openai_server, fresh_upstream):
    with (
        openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key="wrong", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        sdk.images.generate(**SMALL)
    assert raised.value.body["type"] == "authentication_error"
    assert fresh_upstream.requests == []


def test_body_over_the_cap_is_413_in_openai_shape(client, fresh_upstream):
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(prompt="x" * 70_000)
    assert raised.value.status_code == 413
    assert raised.value.body["type"] == "invalid_request_error"


def test_upstream_rate_limit_is_a_rate_limit_error(client, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": "7"}))
    with pytest.raises(openai.RateLimitError) as raised:
        client.images.generate(**SMALL)
    assert raised.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("fault", "status", "native", "retry_after"),
    [
        (Fault(status=429, headers={"Retry-After": "7"}), 429, 429, "7"),
        (Fault(status=503, body=b'{"error": "Model is currently loading", "estimated_time": 40}'), 503, 503, "40"),
        (Fault(status=500, body=b"<html>at http://10.0.0.3/</html>"), 502, 502, None),
        (Fault(status=401), 502, 502, None),
        (Fault(body=b"<html>nginx</html>", headers={"Content-Type": "text/html"}), 502, 502, None),
        (Fault(hang=5), 504, 504, None),
        (Fault(status=400, body=b'{"error": "guidance_scale is too high"}'), 400, 422, None),
    ],
    ids=["429", "503-loading", "500", "401", "not-an-image", "hang", "rejected"],
)
def test_upstream_faults_get_the_native_routes_statuses(
    client, openai_server, fresh_upstream, fault, status, native, retry_after
):
    fresh_upstream.fail_next(fault)
    with pytest.raises(openai.APIStatusError) as raised:
        client.images.generate(**SMALL)
    assert raised.value.status_code == status
    assert raised.value.response.headers.get("retry-after") == retry_after
    message = raised.value.body["message"]
    assert "10.0.0.3" not in message and "127.0.0.1" not in message

    fresh_upstream.fail_next(fault)
    native_body = json.dumps({"prompt": "a fox in the snow", "width": 64, "height": 64}).encode()
    code, headers, _ = post_raw(openai_server, native_body, {"Authorization": f"Bearer {KEY}"})
    assert (code, headers.get("retry-after")) == (native, retry_after)


def test_models_lists_the_served_image_model(client):
    assert [model.id for model in client.models.list()] == ["black-forest-labs/FLUX.1-schnell"]


def test_openapi_tells_the_truth(openai_server):
    with urllib.request.urlopen(f"{openai_server.url}/openapi.json", timeout=30) as response:
        schema = json.load(response)
    native = schema["paths"]["/image_generation/run"]["post"]["responses"]
    assert sorted(native["200"]["content"]) == ["image/jpeg", "image/png", "image/webp"]
    assert native["200"]["content"]["image/png"]["schema"] == {"type": "string", "format": "binary"}
    for status in ("401", "413", "422", "429", "502", "503", "504"):
        assert "application/json" in native[status]["content"], status
    assert "Retry-After" in native["429"]["headers"]
    images = schema["paths"]["/v1/images/generations"]["post"]
    assert {"400", "401", "429", "502", "503", "504"} <= set(images["responses"])
    assert "get" in schema["paths"]["/v1/models"]
    assert "post" in schema["paths"]["/mcp"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_on_the_openai_route(openai_server, fresh_upstream, tmp_path):
    """Fuzz the published schema of `/v1/images/generations` with a valid key: no answer may be a 5xx."""
    fuzz = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{openai_server.url}/openapi.json",
         "--include-path", "/v1/images/generations", "--checks", "not_a_server_error", "-H",
         f"Authorization: Bearer {KEY}", "--max-examples", "100", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert fuzz.returncode == 0, fuzz.stdout[-3000:]
    assert "passed" in fuzz.stdout
