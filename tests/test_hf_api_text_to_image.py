"""HuggingFaceAPITextToImage against the fake upstream: Haystack's per-component list plus the request contract."""

import asyncio
import subprocess
import sys
from ipaddress import ip_network

import pytest
from conftest import ROOT, TEST_TOKEN, decode, wait_for
from fake_upstream import Fault
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.utils import Secret

from components import HuggingFaceAPITextToImage
from components.errors import InvalidImageError, InvalidRequestError, UpstreamError, UpstreamRejectedError
from components.hf_transport import check_address
from image_generation_server.generation import (
    COMPONENT,
    EDIT_COMPONENT,
    EDIT_PIPELINE_FILES,
    PIPELINE_FILES,
    load_pipeline,
)
from image_generation_server.settings import Settings, env_name, load_settings

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
    assert component.token == Secret.from_env_var(["HF_API_TOKEN", "HF_TOKEN"], strict=False)
    assert (component.defaults.width, component.defaults.height, component.defaults.output_format) == (512, 512, "png")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        *(
            ({"endpoint_url": url}, "endpoint_url")
            for url in ("file:///etc/passwd", "http://", "https:/x", "http://h:x/")
        ),
        ({"router_url": "ftp://x"}, "router_url"),
        ({"width": 100}, "width"),
        ({"model": "../x"}, "model"),
    ],
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
            "token": {"type": "env_var", "env_vars": ["HF_API_TOKEN", "HF_TOKEN"], "strict": False},
            "width": 1024,
            "height": 512,
            "num_inference_steps": None,
            "guidance_scale": None,
            "output_format": "png",
            "allowed_models": None,
            "timeout": 30,
            "max_image_bytes": None,
            "router_url": None,
            "max_inflight_bytes": None,
            "result_url_allow": None,
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
    assert "XML:com.adobe.xmp" not in picture.text  # a plain client: marking is the pipeline's next step
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
        {"prompt": "x", "n": 0},
        {"prompt": "x", "n": 11},
        {"prompt": "x", "n": True},
        {"prompt": "x", "n": 2, "seed": 2**32 - 1},
    ],
)
def test_bad_input_costs_nothing_upstream(generator, fresh_upstream, kwargs):
    with pytest.raises(InvalidRequestError):
        generator.run(**kwargs)
    assert fresh_upstream.requests == []


async def test_n_images_are_made_at_once_and_equal_their_seeds_alone(fresh_upstream, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    generator = HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url, width=64, height=64)
    fresh_upstream.latency = 0.3  # long enough for the three calls to overlap
    batch = (await generator.run_async(prompt="a batch", seed=40, n=3))["images"]
    assert fresh_upstream.max_in_flight == 3
    fresh_upstream.latency = 0
    assert [image.meta["seed"] for image in batch] == [40, 41, 42]
    for i, image in enumerate(batch):
        alone = (await generator.run_async(prompt="a batch", seed=40 + i))["images"][0]
        assert image.base64_image == alone.base64_image
    assert len(fresh_upstream.requests) == 6  # a client keeps nothing: every image was made
    await generator.close_async()


async def test_progress_goes_to_the_runs_callback(generator, fresh_upstream):
    events: list[dict] = []
    await generator.run_async(prompt="watched", width=64, height=64, seed=2, progress_callback=events.append)
    assert [event["phase"] for event in events] == ["upstream", "received"]
    assert events[0]["status"] == 200
    await generator.close_async()


def test_a_callback_that_raises_stops_the_run(generator, fresh_upstream):
    def refuse(event: dict) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        generator.run(prompt="stopped", width=64, height=64, progress_callback=refuse)


def test_n_images_sync_with_a_random_seed(generator, fresh_upstream):
    images = generator.run(prompt="two", width=64, height=64, n=2)["images"]
    first = images[0].meta["seed"]
    assert [image.meta["seed"] for image in images] == [first, first + 1]
    assert [r.payload["parameters"]["seed"] for r in fresh_upstream.requests] == [first, first + 1]


async def test_a_failed_image_fails_the_batch_and_cancels_the_rest(generator, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=500), Fault(hang=5), Fault(hang=5))  # the first to arrive fails
    with pytest.raises(UpstreamError):
        await generator.run_async(prompt="doomed batch", width=64, height=64, n=3)
    dropped = await asyncio.to_thread(wait_for, lambda: fresh_upstream.abandoned == 2, 3)
    assert dropped, "the two other upstream calls outlived the failed batch"
    await generator.close_async()


def test_the_operators_settings_reach_every_generator_when_its_pipeline_loads(fresh_upstream, monkeypatch):
    """The server's settings become init parameters (the YAML shows them); the components read no environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    settings = load_settings(
        endpoint=fresh_upstream.url, models="a/one, b/two", timeout=9, max_image_bytes=1 << 20,
        router_url="http://127.0.0.1:9", max_inflight_bytes=1 << 21, result_url_allow="10.1.0.0/16",
    )  # fmt: skip
    expected = {
        "endpoint_url": fresh_upstream.url, "allowed_models": ["a/one", "b/two"], "timeout": 9.0,
        "max_image_bytes": 1 << 20, "router_url": "http://127.0.0.1:9", "max_inflight_bytes": 1 << 21,
        "result_url_allow": ["10.1.0.0/16"],
    }  # fmt: skip
    served = [
        (ROOT / "pipelines", PIPELINE_FILES, COMPONENT),
        (ROOT / "pipelines" / "image_editing", EDIT_PIPELINE_FILES, EDIT_COMPONENT),
    ]
    for folder, files, name in served:
        init = load_pipeline(folder, settings, files).get_component(name).to_dict()["init_parameters"]
        assert {key: init[key] for key in expected} == expected
    generator = load_pipeline(ROOT / "pipelines", settings).get_component(COMPONENT)
    assert generator.run(prompt="x", model="b/two", seed=1)["images"][0].meta["model"] == "b/two"
    with pytest.raises(InvalidRequestError, match="not served"):
        generator.run(prompt="x", model="c/three")
    assert len(fresh_upstream.requests) == 1
    # Unset, the YAML's values stay (null: the component's defaults).
    init = load_pipeline(ROOT / "pipelines", load_settings()).get_component(COMPONENT).to_dict()["init_parameters"]
    assert all(init[key] is None for key in expected)


def test_the_component_reads_no_environment(monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("IMAGE_GENERATION_MODELS", "a/one")
    generator = HuggingFaceAPITextToImage()
    generator.warm_up()
    assert generator.upstream_urls()[0] != "http://127.0.0.1:9"
    assert generator.settings is not None and generator.settings.allowed_models is None
    generator.close()


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


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HF_API_TOKEN": "from-api-token", "HF_TOKEN": "from-token"}, "from-api-token"),
        ({"HF_TOKEN": "from-token"}, "from-token"),
        ({}, "from-file"),
    ],
)
def test_token_sources_in_order(fresh_upstream, monkeypatch, tmp_path, env, expected):
    (tmp_path / "secret").write_text("from-file\n")
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "secret"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url).run(prompt="token", width=64, height=64, seed=1)
    assert fresh_upstream.requests[0].headers["authorization"] == f"Bearer {expected}"


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_unusable_token_file_fails_warm_up(monkeypatch, tmp_path, content):
    if content is not None:
        (tmp_path / "secret").write_text(content)
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "secret"))
    with pytest.raises(ValueError, match="HF_TOKEN_FILE"):
        HuggingFaceAPITextToImage().warm_up()


def test_no_token_and_no_endpoint_warns(caplog):
    HuggingFaceAPITextToImage().warm_up()
    assert "No Hugging Face token" in caplog.text


def test_only_providers_that_answer_without_polling():
    for provider in ("auto", "hf-inference", "fal-ai", "replicate", "together", "nscale"):
        HuggingFaceAPITextToImage(provider=provider)
    with pytest.raises(ValueError, match="provider"):
        HuggingFaceAPITextToImage(provider="wavespeed")  # its replies are jobs to poll


@pytest.mark.parametrize(
    ("addresses", "allowed", "ok"),
    [
        (["93.184.216.34"], (), True),
        (["2606:2800:220:1:248:1893:25c8:1946"], (), True),
        (["127.0.0.1"], (), False),
        (["::1"], (), False),
        (["::ffff:127.0.0.1"], (), False),
        (["10.1.2.3"], (), False),
        (["172.16.0.1"], (), False),
        (["192.168.1.1"], (), False),
        (["169.254.169.254"], (), False),
        (["fe80::1%eth0"], (), False),
        (["fd00::1"], (), False),
        (["100.64.0.1"], (), False),  # carrier-grade NAT
        (["0.0.0.0"], (), False),
        (["93.184.216.34", "127.0.0.1"], (), False),  # one inside answer is enough to refuse
        (["127.0.0.2"], (ip_network("127.0.0.2/32"),), True),
        (["127.0.0.1"], (ip_network("127.0.0.2/32"),), False),
        ([], (), False),
    ],
)
def test_result_addresses(addresses, allowed, ok):
    if ok:
        assert str(check_address(addresses, allowed)) == addresses[0]
    else:
        with pytest.raises(InvalidImageError):
            check_address(addresses, allowed)
