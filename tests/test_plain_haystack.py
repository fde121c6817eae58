"""
A Haystack user's own pipeline: each generator is a plain client, as Haystack's `OpenAIImageGenerator` is.

Whatever the serving environment says (a tiny queue, a cache, a Redis to share it), the component neither queues
nor refuses, caches nothing, talks to no Redis and leaves the image's metadata alone: those belong to the server
(`image_generation_server.generation`), and marking belongs to `AIImageMarker`, a step the pipeline shows.
"""

import asyncio
import base64
import sys

import pytest
import redis
from conftest import ROOT, TEST_TOKEN
from haystack import Pipeline
from image_parts import coded_pixels
from redis_server import RedisServer

from components import AIImageMarker, HuggingFaceAPITextToImage
from components.image_codec import PNG_SIGNATURE

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

# What a serving process sets; a plain component reads none of it.
SERVING_ENV = {
    "IMAGE_GENERATION_MAX_CONCURRENCY": "1",
    "IMAGE_GENERATION_MAX_QUEUE": "0",
    "IMAGE_GENERATION_CACHE_BYTES": str(64 * 1024 * 1024),
    "IMAGE_GENERATION_EMBED_PARAMETERS": "true",
}


@pytest.fixture
def serving_env(monkeypatch, tmp_path):
    """The serving environment, its Redis real and running."""
    shared = RedisServer(tmp_path).start()
    for name, value in {**SERVING_ENV, "IMAGE_GENERATION_CACHE_REDIS_URL": shared.url}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    yield redis.Redis.from_url(shared.url)
    shared.stop()


def data_of(image) -> bytes:
    return base64.b64decode(image.base64_image)


async def test_hf_api_generator_in_a_users_pipeline_is_a_plain_client(serving_env, fresh_upstream):
    pipeline = Pipeline()
    pipeline.add_component("generator", HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url, width=64, height=64))
    fresh_upstream.latency = 0.3  # long enough for the calls to overlap

    async def seeded() -> bytes:
        result = await pipeline.run_async({"generator": {"prompt": "a plain client", "seed": 5}})
        return data_of(result["generator"]["images"][0])

    await asyncio.gather(*(seeded() for _ in range(8)))  # one slot and no queue would refuse seven
    assert fresh_upstream.max_in_flight == 8  # neither queued nor coalesced

    fresh_upstream.latency = 0
    image = await seeded()
    assert len(fresh_upstream.requests) == 9  # nor cached: the same seed went upstream each time
    assert image == fresh_upstream.image("a plain client", 5, 64, 64, "png")  # byte for byte: no metadata rewritten
    assert serving_env.dbsize() == 0  # no Redis
    await pipeline.get_component("generator").close_async()


def test_diffusers_generator_in_a_users_pipeline_is_a_plain_client(serving_env, tmp_path):
    from components.diffusers_text_to_image import DiffusersTextToImage  # noqa: PLC0415 - needs the local extra

    pipeline = Pipeline()
    model = build(tmp_path / "tiny-sd")
    pipeline.add_component("generator", DiffusersTextToImage(model=str(model), width=64, height=64))
    steps: list[dict] = []

    def run(seed: int) -> bytes:
        inputs = {"prompt": "a plain model", "seed": seed, "num_inference_steps": 2, "progress_callback": steps.append}
        return data_of(pipeline.run({"generator": inputs})["generator"]["images"][0])

    first, again = run(5), run(5)

    assert first == again and first.startswith(PNG_SIGNATURE)
    assert [event["phase"] for event in steps].count("step") == 4  # made twice: nothing was cached
    assert b"XML:com.adobe.xmp" not in first and b"a plain model" not in first  # no mark, no parameters
    assert serving_env.dbsize() == 0  # no Redis


def test_marking_is_a_step_the_users_pipeline_shows(serving_env, fresh_upstream):
    pipeline = Pipeline()
    pipeline.add_component("generator", HuggingFaceAPITextToImage(endpoint_url=fresh_upstream.url, width=64, height=64))
    pipeline.add_component("marker", AIImageMarker())
    pipeline.connect("generator.images", "marker.images")

    result = pipeline.run({"generator": {"prompt": "marked", "seed": 9}}, include_outputs_from={"generator"})

    plain, marked = result["generator"]["images"][0], result["marker"]["images"][0]
    assert b"XML:com.adobe.xmp" not in data_of(plain)
    assert b"trainedAlgorithmicMedia" in data_of(marked)
    assert b"marked" not in data_of(marked)  # the marker's own `embed_parameters` is off; the environment is not read
    assert coded_pixels(data_of(marked), "png") == coded_pixels(data_of(plain), "png")
    assert plain.meta["prompt"] == "marked" and "prompt" not in marked.meta  # the image says it only if embedded
    assert marked.meta == {name: value for name, value in plain.meta.items() if "prompt" not in name}
