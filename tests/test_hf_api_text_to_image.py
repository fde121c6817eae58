"""HuggingFaceAPITextToImage against the fake upstream: Haystack's per-component list plus the request contract."""

import subprocess
import sys

import pytest
from conftest import ROOT, TEST_TOKEN, decode
from fake_upstream import Fault
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.utils import Secret

from components import HuggingFaceAPITextToImage
from components.errors import InvalidRequestError, UpstreamRejectedError

TYPE = "components.hf_api_text_to_image.HuggingFaceAPITextToImage"


@pytest.fixture
def generator(fresh_upstream, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    component = HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url)
    yield component
    component.close()


def test_init_default():
    component = HuggingFaceAPITextToImage()
    assert component.model == "black-forest-labs/FLUX.1-schnell"
    assert component.provider == "auto"
    assert component.endpoint_url is None
    assert component.token == Secret.from_env_var(["HF_TOKEN", "HF_API_TOKEN"], strict=False)
    assert (component.defaults.width, component.defaults.height, component.defaults.output_format) == (512, 512, "png")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"endpoint_url": "file:///etc/passwd"}, "endpoint_url"), ({"width": 100}, "width"), ({"model": "../x"}, "model")],
)
def test_init_rejects_bad_settings(kwargs, named):
    with pytest.raises(ValueError, match=named):
        HuggingFaceAPITextToImage(**kwargs)


def test_to_dict():
    component = HuggingFaceAPITextToImage(model="stabilityai/sdxl-turbo", provider="fal-ai", width=1024, timeout=30)
    assert component.to_dict() == {
        "type": TYPE,
        "init_parameters": {
            "model": "stabilityai/sdxl-turbo",
            "provider": "fal-ai",
            "endpoint_url": None,
            "token": {"type": "env_var", "env_vars": ["HF_TOKEN", "HF_API_TOKEN"], "strict": False},
            "width": 1024,
            "height": 512,
            "num_inference_steps": None,
            "guidance_scale": None,
            "output_format": "png",
            "allowed_models": None,
            "timeout": 30,
            "max_image_bytes": None,
            "max_concurrency": None,
            "max_queue": None,
            "cache_max_bytes": None,
        },
    }


def test_from_dict():
    data = {
        "type": TYPE,
        "init_parameters": {
            "model": "m/n",
            "endpoint_url": "http://127.0.0.1:9/",
            "token": {"type": "env_var", "env_vars": ["MY_TOKEN"], "strict": False},
            "output_format": "webp",
        },
    }
    component = HuggingFaceAPITextToImage.from_dict(data)
    assert component.model == "m/n"
    assert component.endpoint_url == "http://127.0.0.1:9/"
    assert component.token == Secret.from_env_var("MY_TOKEN", strict=False)
    assert component.defaults.output_format == "webp"


def test_run(generator, fresh_upstream):
    image = generator.run(prompt="A cat sitting on a rainbow", width=256, height=128, seed=0)["images"][0]

    assert image.mime_type == "image/png"
    picture = decode(image)
    assert (picture.format, picture.size) == ("PNG", (256, 128))
    assert image.meta["seed"] == 0  # seed=0 is a seed, not "no seed"
    assert image.meta["upstream_format"] == "png"
    assert list(picture.text) == ["XML:com.adobe.xmp"]  # our XMP mark only (tests/test_provenance.py)
    [seen] = fresh_upstream.requests
    parameters = {"width": 256, "height": 128, "seed": 0}
    assert seen.payload == {"inputs": "A cat sitting on a rainbow", "parameters": parameters}
    assert seen.headers["authorization"] == f"Bearer {TEST_TOKEN}"


async def test_run_async(generator, fresh_upstream):
    result = await generator.run_async(prompt="A dog", negative_prompt="blur", num_inference_steps=4, seed=7)
    image = result["images"][0]

    assert decode(image).size == (512, 512)
    assert image.meta["seed"] == 7
    params = fresh_upstream.requests[0].payload["parameters"]
    assert (params["negative_prompt"], params["num_inference_steps"], params["seed"]) == ("blur", 4, 7)
    await generator.close_async()


def test_picks_a_seed_and_sends_it(generator, fresh_upstream):
    seeds = {generator.run(prompt="unseeded")["images"][0].meta["seed"] for _ in range(3)}
    sent = {r.payload["parameters"]["seed"] for r in fresh_upstream.requests}
    assert seeds == sent
    assert len(seeds) == 3


def test_converts_when_upstream_format_differs(generator, fresh_upstream):
    fresh_upstream.image_format = "jpeg"
    image = generator.run(prompt="converted", seed=1, output_format="png")["images"][0]
    assert decode(image).format == "PNG"
    assert image.meta["upstream_format"] == "jpeg"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt": ""},
        {"prompt": "   "},
        {"prompt": "x" * 2001},
        {"prompt": "bell\x07"},
        {"prompt": "x", "width": 100},
        {"prompt": "x", "height": 4096},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "seed": 2**32},
        {"prompt": "x", "output_format": "gif"},
        {"prompt": "x", "model": "https://attacker.example/steal"},
        {"prompt": "x", "model": "../../etc/passwd"},
    ],
)
def test_bad_input_costs_nothing_upstream(generator, fresh_upstream, kwargs):
    with pytest.raises(InvalidRequestError):
        generator.run(**kwargs)
    assert fresh_upstream.requests == []


def test_allowed_models_from_environment(fresh_upstream, monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_MODELS", "a/one, b/two")
    generator = HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url)
    assert generator.run(prompt="x", model="b/two", seed=1)["images"][0].meta["model"] == "b/two"
    with pytest.raises(InvalidRequestError, match="not served"):
        generator.run(prompt="x", model="c/three")
    assert len(fresh_upstream.requests) == 1


def test_endpoint_from_environment(fresh_upstream, monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_ENDPOINT", fresh_upstream.url)
    HuggingFaceAPITextToImage().run(prompt="routed", seed=1)
    assert len(fresh_upstream.requests) == 1


def test_upstream_reason_is_kept_only_when_safe(generator, fresh_upstream):
    fresh_upstream.fail_next(
        Fault(status=400, body=b'{"error": "width must be at most 1440"}'),
        Fault(status=400, body=b'{"error": "see https://internal.example/x for token hf_abc"}'),
    )
    with pytest.raises(UpstreamRejectedError) as safe:
        generator.run(prompt="a")
    with pytest.raises(UpstreamRejectedError) as unsafe:
        generator.run(prompt="b")
    assert (safe.value.reason, unsafe.value.reason) == ("width must be at most 1440", None)


def test_pipeline_round_trip(fresh_upstream):
    pipeline = Pipeline()
    pipeline.add_component("text_to_image", HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url, height=64))
    allow_deserialization_module("components")
    loaded = Pipeline.loads(pipeline.dumps())
    assert loaded.to_dict() == pipeline.to_dict()
    result = loaded.run({"text_to_image": {"prompt": "round trip", "width": 64}})
    assert decode(result["text_to_image"]["images"][0]).size == (64, 64)


def test_committed_yaml_is_what_the_code_dumps():
    check = subprocess.run(
        [sys.executable, "scripts/build_pipelines.py", "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stderr
