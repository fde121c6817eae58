"""The local diffusers backend: a tiny random-weight Stable Diffusion pipeline, built offline in a temp dir and
loaded through the component's real `from_pretrained` path, then served by a real hayhooks process."""

import asyncio
import base64
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import ROOT, decode, hang_up_during, post, running, server_env, start_server, stop_server
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.utils import ComponentDevice
from PIL import Image
from scrape import METRICS_KEY, scraped, value

from components.diffusers_text_to_image import DiffusersTextToImage
from components.errors import GenerationTimeoutError, InvalidRequestError

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

STEPS = 2
FAST = {"num_inference_steps": STEPS}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def generator(tiny_model):
    component = DiffusersTextToImage(model=str(tiny_model), width=64, height=64, num_inference_steps=STEPS)
    component.warm_up()
    return component


def test_init_default():
    component = DiffusersTextToImage()
    assert component.model is None  # stabilityai/sd-turbo in warm_up (the server sets it from its settings)
    assert (component.device, component.dtype, component.cpu_offload) == (None, "auto", False)
    assert (component.defaults.width, component.defaults.height, component.defaults.output_format) == (512, 512, "png")
    assert component._loaded is None  # nothing is loaded before warm_up


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"size_multiple": 0}, "size_multiple"),
        ({"max_steps": 0}, "max_steps"),
        ({"width": 100}, "width"),
    ],
)
def test_init_rejects_bad_settings(kwargs, named):
    with pytest.raises(ValueError, match=named):
        DiffusersTextToImage(**kwargs)


def test_to_dict():
    component = DiffusersTextToImage(
        model="stabilityai/sd-turbo", device=ComponentDevice.from_str("cpu"), num_inference_steps=2, timeout=30
    )
    assert component.to_dict() == {
        "type": "components.diffusers_text_to_image.DiffusersTextToImage",
        "init_parameters": {
            "model": "stabilityai/sd-turbo",
            "device": {"type": "single", "device": "cpu"},
            "dtype": "auto",
            "cpu_offload": False,
            "width": 512,
            "height": 512,
            "num_inference_steps": 2,
            "guidance_scale": None,
            "output_format": "png",
            "size_multiple": None,
            "max_steps": 150,
            "timeout": 30,
            "preview_decoder": None,
        },
    }


def test_from_dict():
    component = DiffusersTextToImage(
        model="some/model", device=ComponentDevice.from_str("cuda:1"), dtype="bfloat16", guidance_scale=0.0,
        output_format="webp",
    )  # fmt: skip
    component = DiffusersTextToImage.from_dict(component.to_dict())
    assert (component.model, component.device, component.dtype) == (
        "some/model", ComponentDevice.from_str("cuda:1"), "bfloat16",
    )  # fmt: skip
    assert (component.defaults.guidance_scale, component.defaults.output_format) == (0.0, "webp")


def test_run(generator):
    image = generator.run(prompt="a lighthouse", seed=7)["images"][0]
    assert image.mime_type == "image/png"
    png = decode(image)
    assert (png.format, png.size) == ("PNG", (64, 64))
    assert png.text == {}  # a plain generator: marking is the pipeline's next step (tests/test_provenance.py)
    assert image.meta["backend"] == "diffusers"
    assert image.meta["model"] == "tiny-sd"  # a local folder is served under its name
    assert (image.meta["seed"], image.meta["num_inference_steps"]) == (7, STEPS)


async def test_run_async(generator):
    image = (await generator.run_async(prompt="a lighthouse", output_format="jpeg"))["images"][0]
    assert decode(image).format == "JPEG"
    assert 0 <= image.meta["seed"] < 2**32


def test_seed_decides_the_pixels(generator):
    def pixels(seed: int) -> bytes:
        return base64.b64decode(generator.run(prompt="a red fox", seed=seed)["images"][0].base64_image)

    assert pixels(11) == pixels(11)  # a plain generator keeps nothing: both are generated
    assert pixels(11) != pixels(12)


async def test_n_images_equal_their_seeds_alone(generator):
    def pixels(images) -> list[bytes]:
        return [base64.b64decode(image.base64_image) for image in images]

    batch = generator.run(prompt="a red fox", seed=11, n=2)["images"]
    assert [image.meta["seed"] for image in batch] == [11, 12]
    alone = [generator.run(prompt="a red fox", seed=seed)["images"][0] for seed in (11, 12)]
    assert pixels(batch) == pixels(alone)
    assert pixels((await generator.run_async(prompt="a red fox", seed=11, n=2))["images"]) == pixels(alone)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 72}, "width=72 must be a multiple of 32"),
        ({"height": 96 + 8}, "height=104 must be a multiple of 32"),
        ({"num_inference_steps": 9}, "num_inference_steps=9 must be ≤ 8"),
        ({"model": "another/model"}, "is not served here"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
    ],
)
def test_model_limits_are_checked_before_any_compute(tiny_model, caplog, kwargs, message):
    component = DiffusersTextToImage(model=str(tiny_model), size_multiple=32, max_steps=8, width=64, height=64)
    component.warm_up()
    caplog.set_level(logging.INFO)
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        component.run(**{"prompt": "a boat", **kwargs})
    assert "step" not in caplog.text  # no denoising step ran


def test_deadline_stops_generation_at_the_next_step(tiny_model):
    component = DiffusersTextToImage(model=str(tiny_model), width=64, height=64, num_inference_steps=150, timeout=0.2)
    component.warm_up()
    with pytest.raises(GenerationTimeoutError, match=r"stopped at step \d+") as raised:
        component.run(prompt="a slow painting")
    assert int(re.search(r"step (\d+)", str(raised.value)).group(1)) < 150


class _ProgressSeen(logging.Handler):
    """Sets `seen` when a log line contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_cancelled_caller_stops_generation(tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="components.diffusers_text_to_image")
    first_progress = _ProgressSeen("step 15/150")
    logging.getLogger("components.diffusers_text_to_image").addHandler(first_progress)
    component = DiffusersTextToImage(model=str(tiny_model), width=64, height=64, num_inference_steps=150)
    await component.warm_up_async()
    task = asyncio.create_task(component.run_async(prompt="nobody waits for this", seed=3))
    try:
        assert await asyncio.to_thread(first_progress.seen.wait, 60)  # generation is under way
    finally:
        logging.getLogger("components.diffusers_text_to_image").removeHandler(first_progress)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lock = component._loaded.lock
    assert await asyncio.to_thread(lock.acquire, timeout=60)  # the worker thread let go of the device...
    lock.release()
    assert "step 150/150" not in caplog.text  # ...before the last step


def test_weights_load_once_per_process(tiny_model):
    first, second = (DiffusersTextToImage(model=str(tiny_model), width=64, height=64) for _ in range(2))
    first.warm_up()
    second.warm_up()
    assert first._loaded is second._loaded


def test_pipeline_round_trip(tiny_model):
    pipeline = Pipeline()
    pipeline.add_component("text_to_image", DiffusersTextToImage(model=str(tiny_model), num_inference_steps=STEPS))
    allow_deserialization_module("components")
    loaded = Pipeline.loads(pipeline.dumps())
    assert loaded.to_dict() == pipeline.to_dict()
    result = loaded.run({"text_to_image": {"prompt": "round trip", "width": 64, "height": 64}})
    assert decode(result["text_to_image"]["images"][0]).size == (64, 64)


@pytest.fixture(scope="module")
def local_server(tiny_model, tmp_path_factory):
    """A real hayhooks server on the local backend: configuration only, the same wrapper and route."""
    env = server_env(
        IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(tiny_model),
        IMAGE_GENERATION_CACHE_BYTES="0", IMAGE_GENERATION_METRICS_KEY=METRICS_KEY,
        HAYHOOKS_LOG_LEVEL="DEBUG",  # each image's "Generated ..." line
    )  # fmt: skip
    with running(tmp_path_factory.mktemp("local-server"), env, timeout=120) as server:
        yield server


def test_endpoint_serves_a_png(local_server):
    status, headers, body = post(local_server, {"prompt": "a cat", "width": 64, "height": 64, **FAST})
    assert status == 200, body
    assert headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(body))
    assert (png.format, png.size) == ("PNG", (64, 64))
    assert b"trainedAlgorithmicMedia" in png.text["XML:com.adobe.xmp"].encode()


def test_ready_once_the_model_is_loaded(local_server):
    """`/ready` (the container's healthcheck) for a local model: loaded, on its device, no upstream to reach."""
    with urllib.request.urlopen(f"{local_server.url}/ready", timeout=30) as response:
        assert (response.status, json.load(response)) == (200, {"ready": True, "checks": {"pipeline": "ok"}})


def test_endpoint_seed_reproduces_the_bytes(local_server):
    def image(seed: int) -> bytes:
        status, _, body = post(local_server, {"prompt": "a dog", "width": 64, "height": 64, "seed": seed, **FAST})
        assert status == 200, body
        return body

    assert image(5) == image(5)  # the server's cache is off: both are generated
    assert image(5) != image(6)


def test_endpoint_refuses_another_model_with_422(local_server):
    status, _, body = post(local_server, {"prompt": "a cat", "width": 64, "height": 64, "model": "other/model"})
    assert status == 422
    assert "is not served here" in json.loads(body)["detail"]


def test_model_loads_once_for_many_requests(local_server):
    for seed in range(5):
        assert post(local_server, {"prompt": "again", "width": 64, "height": 64, "seed": seed, **FAST})[0] == 200
    log = local_server.log()
    assert log.count("Loading diffusers model") == 1
    assert log.count("Generated 64x64 png with tiny-sd") >= 5


def test_client_disconnect_stops_generation(local_server):
    slow = {"prompt": "nobody waits", "width": 128, "height": 128, "seed": 11, "num_inference_steps": 150}  # ~9 s
    hang_up_during(
        local_server, json.dumps(slow).encode(), started=lambda: "Seed 11: step 15/150" in local_server.log()
    )
    assert post(local_server, {"prompt": "next", "width": 64, "height": 64, **FAST})[0] == 200  # the device is free
    log = local_server.log()
    assert "Client disconnected: cancelled POST /image_generation/run" in log
    assert "Seed 11: step 150/150" not in log


def test_metrics_count_denoising_steps(local_server):
    steps = "image_generation_denoising_steps_total", "image_generation_denoising_seconds_total"
    images = "image_generation_images_total"
    before = scraped(local_server)
    assert (
        post(local_server, {"prompt": "counted steps", "width": 64, "height": 64, "num_inference_steps": 3})[0] == 200
    )
    after = scraped(local_server)
    assert value(after, steps[0]) - value(before, steps[0]) == 3
    assert value(after, steps[1]) > value(before, steps[1])
    labels = {"model": "tiny-sd", "size": "256x256", "format": "png"}  # the served model's name
    assert value(after, images, **labels) - value(before, images, **labels) == 1
    assert value(after, "image_generation_generation_seconds_count") > value(
        before, "image_generation_generation_seconds_count"
    )
    # On the CPU there is no device memory to report: the series stay at 0.
    assert value(after, "image_generation_device_memory_peak_bytes") == 0


def test_missing_model_folder_is_a_clear_startup_error(tmp_path):
    missing = tmp_path / "no-such-model"
    env = server_env(IMAGE_GENERATION_BACKEND="local", IMAGE_GENERATION_LOCAL_MODEL=str(missing))
    server = start_server(tmp_path, env, deployed=False, timeout=120)
    try:
        with urllib.request.urlopen(f"{server.url}/status", timeout=5) as response:
            assert "image_generation" not in json.load(response)["pipelines"]
        assert f"the diffusers model folder {missing} does not exist" in server.log()
    finally:
        stop_server(server)


async def test_worker_threads_are_not_leaked(generator):
    """`run_async` works on the loop's default executor: more calls than it has workers add no thread beyond them."""
    workers = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default max_workers
    before = threading.active_count()
    for seed in range(workers + 2):
        await generator.run_async(prompt="threads", seed=seed)
    assert threading.active_count() <= before + workers


def test_missing_extra_is_a_clear_error():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from components.diffusers_text_to_image import DiffusersTextToImage\n"
        "DiffusersTextToImage()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert 'pip install ".[local]"' in result.stderr
