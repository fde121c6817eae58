"""
The editing components on both backends: `HuggingFaceAPIImageToImage` against the fake upstream (which speaks the
providers' image-to-image protocol), `DiffusersImageToImage` on the tiny random-weight model, 64x64, 2 steps.

The mask's promise is checked by decoding input and output and comparing every pixel outside the mask.
"""

import asyncio
import base64
import io
import sys

import numpy as np
import pytest
import torch
from c2pa_ca import make_credentials
from conftest import ROOT, TEST_TOKEN, decode
from fake_upstream import render
from haystack import Pipeline
from haystack.core.serialization import allow_deserialization_module
from haystack.dataclasses import ImageContent
from PIL import Image
from test_provenance import c2pa_report, exiftool

from components import AIImageMarker
from components.diffusers_image_to_image import DiffusersImageToImage
from components.errors import InvalidRequestError
from components.hf_api_image_to_image import HuggingFaceAPIImageToImage

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
SIZE = (64, 64)
SOURCE = Image.open(io.BytesIO(render("a source picture", 1, *SIZE, "png"))).convert("RGB")


def content(image: Image.Image, fmt: str = "PNG", **options) -> ImageContent:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return ImageContent(base64_image=base64.b64encode(out.getvalue()).decode(), mime_type=f"image/{fmt.lower()}")


def hole(box: tuple[int, int, int, int] = (16, 16, 48, 40), size: tuple[int, int] = SIZE) -> Image.Image:
    """An opaque mask with a fully transparent box: what to edit."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def pixels(image: ImageContent | Image.Image) -> np.ndarray:
    picture = decode(image) if isinstance(image, ImageContent) else image
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def assert_kept_outside(output: ImageContent, source: Image.Image, mask: Image.Image) -> None:
    """Every pixel where the mask is not fully transparent is the source's; the edited box changed."""
    kept = np.asarray(mask)[:, :, 3] != 0
    out, src = pixels(output), pixels(source)
    assert out.shape == src.shape
    assert (out[kept] == src[kept]).all()
    assert np.abs(out[~kept] - src[~kept]).mean() > 1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def local(tiny_model):
    editor = DiffusersImageToImage(model=str(tiny_model), num_inference_steps=2)
    editor.warm_up()
    return editor


@pytest.fixture
def api(fresh_upstream, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    editor = HuggingFaceAPIImageToImage(endpoint_url=fresh_upstream.url)
    yield editor
    editor.close()


def test_init_default():
    editor = HuggingFaceAPIImageToImage()
    assert (editor.task, editor.provider, editor.endpoint_url) == ("image-to-image", "auto", None)
    assert DiffusersImageToImage()._loaded is None  # nothing loaded before warm_up


def test_provider_without_image_to_image_is_refused():
    with pytest.raises(ValueError, match="provider='nscale' must be 'auto' or one of hf-inference, replicate"):
        HuggingFaceAPIImageToImage(provider="nscale")


def test_to_dict():
    assert HuggingFaceAPIImageToImage(model="a/b", width=64).to_dict() == {
        "type": "components.hf_api_image_to_image.HuggingFaceAPIImageToImage",
        "init_parameters": {
            "model": "a/b", "provider": "auto", "endpoint_url": None,
            "token": {"env_vars": ["HF_API_TOKEN", "HF_TOKEN"], "strict": False, "type": "env_var"},
            "width": 64, "height": 512, "num_inference_steps": None, "guidance_scale": None, "output_format": "png",
            "allowed_models": None, "timeout": None, "max_image_bytes": None, "router_url": None,
            "max_inflight_bytes": None, "result_url_allow": None,
        },
    }  # fmt: skip
    assert DiffusersImageToImage(model="m").to_dict()["type"] == (
        "components.diffusers_image_to_image.DiffusersImageToImage"
    )


def test_from_dict():
    editor = HuggingFaceAPIImageToImage.from_dict(HuggingFaceAPIImageToImage(provider="together").to_dict())
    assert (type(editor), editor.provider) == (HuggingFaceAPIImageToImage, "together")
    local = DiffusersImageToImage.from_dict(DiffusersImageToImage(model="m", output_format="webp").to_dict())
    assert (local.model, local.defaults.output_format) == ("m", "webp")


def test_pipeline_round_trip():
    allow_deserialization_module("components")
    pipeline = Pipeline()
    pipeline.add_component("image_to_image", HuggingFaceAPIImageToImage(model="a/b"))
    assert Pipeline.loads(pipeline.dumps()).dumps() == pipeline.dumps()


# --- the Hugging Face API backend, against the fake upstream ---


def test_run_sends_the_image_to_image_task(api, fresh_upstream):
    rotated = Image.Exif()
    rotated[0x0112] = 3  # upside down: the upstream gets the picture the right way up
    upload = content(SOURCE.rotate(180), "JPEG", exif=rotated, quality=95)
    [image] = api.run(image=upload, prompt="a red hat", seed=5, strength=0.6)["images"]
    assert decode(image).size == SIZE
    assert (image.meta["seed"], image.meta["strength"], image.meta["masked"]) == (5, 0.6, False)
    [seen] = fresh_upstream.requests
    assert seen.payload["parameters"] == {
        "prompt": "a red hat", "target_size": {"width": 64, "height": 64}, "seed": 5, "strength": 0.6,
    }  # fmt: skip
    sent = base64.b64decode(seen.payload["inputs"])
    assert sent.startswith(b"\x89PNG")  # our PNG of the decoded pixels, never the client's bytes (EXIF and all)
    received = pixels(Image.open(io.BytesIO(sent)))
    upright, upside_down = (np.abs(received - pixels(picture)).mean() for picture in (SOURCE, SOURCE.rotate(180)))
    assert upright < 10 < upside_down  # JPEG noise apart, the source the right way up


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_api_keeps_every_pixel_outside_the_mask(api, fmt):
    mask = hole()
    [image] = api.run(image=content(SOURCE), mask=content(mask, fmt.upper(), lossless=True), prompt="a hat")["images"]
    assert image.meta["masked"] is True
    assert_kept_outside(image, SOURCE, mask)


async def test_api_n_images_equal_their_seeds_alone(api):
    upload, mask = content(SOURCE), content(hole())
    batch = (await api.run_async(image=upload, mask=mask, prompt="a hat", seed=40, n=2))["images"]
    assert [image.meta["seed"] for image in batch] == [40, 41]
    for image in batch:
        [alone] = api.run(image=upload, mask=mask, prompt="a hat", seed=image.meta["seed"])["images"]
        assert alone.base64_image == image.base64_image
        assert_kept_outside(image, SOURCE, hole())


def test_requested_size_resizes_the_image_and_the_mask(api, fresh_upstream):
    [image] = api.run(image=content(SOURCE), mask=content(hole()), prompt="a hat", width=128, height=96)["images"]
    assert decode(image).size == (128, 96)
    assert fresh_upstream.requests[0].payload["parameters"]["target_size"] == {"width": 128, "height": 96}
    source = SOURCE.resize((128, 96), Image.Resampling.LANCZOS)
    assert_kept_outside(image, source, hole().resize((128, 96), Image.Resampling.NEAREST))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"image": content(SOURCE, "BMP")}, "image must be a PNG, JPEG or WebP file"),
        ({"mask": content(hole(size=(32, 32)))}, "mask is 32x32; it must be the image's size, 64x64"),
        ({"mask": content(SOURCE)}, "mask has no alpha channel"),
        ({"strength": 1.5}, "strength must be a number in 0..1"),
        ({"image": content(Image.new("RGB", (70, 64)))}, "width=70 must be a multiple of 8"),
    ],
)
def test_bad_uploads_cost_nothing_upstream(api, fresh_upstream, inputs, message):
    with pytest.raises(InvalidRequestError, match=message):
        api.run(**{"image": content(SOURCE), "prompt": "a hat", **inputs})
    assert fresh_upstream.requests == []


# --- the local diffusers backend, on the tiny model ---


def test_local_keeps_every_pixel_outside_the_mask(local):
    mask = hole()
    [image] = local.run(image=content(SOURCE), mask=content(mask), prompt="a hat", seed=3)["images"]
    assert (image.meta["backend"], image.meta["masked"]) == ("diffusers", True)
    assert_kept_outside(image, SOURCE, mask)


async def test_local_n_images_equal_their_seeds_alone(local):
    upload, mask = content(SOURCE), content(hole())
    batch = (await local.run_async(image=upload, mask=mask, prompt="a hat", seed=20, n=2))["images"]
    assert [image.meta["seed"] for image in batch] == [20, 21]
    assert batch[0].base64_image != batch[1].base64_image
    for image in batch:
        [alone] = local.run(image=upload, mask=mask, prompt="a hat", seed=image.meta["seed"])["images"]
        assert alone.base64_image == image.base64_image


def test_strength_decides_how_far_from_the_input(local):
    """
    Near 0 the result is close to the input, at 1 far from it, measured against the input as the model's VAE
    reproduces it (random weights: encoding and decoding alone is no identity).
    """
    pipeline = local._loaded.pipeline
    with torch.no_grad():
        latents = pipeline.vae.encode(pipeline.image_processor.preprocess(SOURCE)).latent_dist.mode()
        reproduced = pipeline.image_processor.postprocess(pipeline.vae.decode(latents).sample, output_type="pil")[0]

    def distance(strength: float) -> float:
        [image] = local.run(image=content(SOURCE), prompt="a hat", seed=3, strength=strength, num_inference_steps=20)[
            "images"
        ]
        return float(np.abs(pixels(image) - pixels(reproduced)).mean())

    near, far = distance(0.05), distance(1.0)
    assert near < far / 2, (near, far)


def test_too_little_strength_for_the_steps_is_refused_before_any_compute(local):
    with pytest.raises(InvalidRequestError, match=r"strength=0.2 leaves no denoising step of 2"):
        local.run(image=content(SOURCE), prompt="a hat", strength=0.2)


def weight_bytes(pipelines: list) -> int:
    """The bytes of the distinct tensors (parameters and buffers) that the pipelines' models hold in memory."""
    tensors = {}
    for pipeline in pipelines:
        for module in pipeline.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(tensors.values())


def test_edits_reuse_the_loaded_weights(local):
    loaded = local._loaded
    weights = {name: p.data_ptr() for name, p in loaded.pipeline.unet.named_parameters()}
    before = weight_bytes([loaded.pipeline])
    local.run(image=content(SOURCE), prompt="a hat")
    local.run(image=content(SOURCE), mask=content(hole()), prompt="a hat")
    assert set(loaded.derived) == {"img2img", "inpaint"}
    # Memory held by weights, before the first edit and after both kinds: the same bytes, no second copy.
    assert weight_bytes([loaded.pipeline, *loaded.derived.values()]) == before > 0
    for pipeline in loaded.derived.values():
        assert pipeline.unet is loaded.pipeline.unet and pipeline.vae is loaded.pipeline.vae
        assert {name: p.data_ptr() for name, p in pipeline.unet.named_parameters()} == weights
    # ...and a text-to-image component of the same settings shares them too: one copy per process.
    twin = DiffusersImageToImage(model=local.model)
    twin.warm_up()
    assert twin._loaded is loaded


async def test_local_edit_reports_steps_and_stops_when_cancelled(local):
    seen: list[dict] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def report(event: dict) -> None:
        seen.append(event)
        if event.get("phase") == "step":
            loop.call_soon_threadsafe(started.set)

    task = asyncio.create_task(
        local.run_async(
            image=content(SOURCE),
            mask=content(hole()),
            prompt="a hat",
            num_inference_steps=150,
            progress_callback=report,
        )
    )
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    steps = [event for event in seen if event.get("phase") == "step"]
    assert steps and steps[-1]["step"] < steps[-1]["steps"]
    lock = local._loaded.lock
    assert await asyncio.to_thread(lock.acquire, timeout=60)  # the device is free again
    lock.release()


# --- marks ---


def marked_edit(editor, marker: AIImageMarker, **params) -> ImageContent:
    """An edit through the served pipeline's shape: the editor, then the marker told the source."""
    pipeline = Pipeline()
    pipeline.add_component("image_to_image", editor)
    pipeline.add_component("ai_image_marker", marker)
    pipeline.connect("image_to_image.images", "ai_image_marker.images")
    source = content(SOURCE)
    result = pipeline.run({"image_to_image": {"image": source, **params}, "ai_image_marker": {"source": source}})
    [image] = result["ai_image_marker"]["images"]
    return image


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_edits_are_marked_as_composites_with_generated_content(api, fmt, tmp_path):
    image = marked_edit(api, AIImageMarker(), mask=content(hole()), prompt="a hat", output_format=fmt)
    tags = exiftool(base64.b64decode(image.base64_image), tmp_path, "-XMP:all")
    assert tags["DigitalSourceType"] == COMPOSITE


def test_a_signed_edit_validates_with_an_edited_action(api, tmp_path):
    chain, key = make_credentials(tmp_path)
    marker = AIImageMarker(c2pa_cert=str(chain), c2pa_key=str(key))
    image = marked_edit(api, marker, mask=content(hole()), prompt="a hat")
    codes, manifest = c2pa_report(base64.b64decode(image.base64_image), "png")
    assert codes == ["signingCredential.untrusted"]  # valid, by a CA no trust list knows
    [actions] = [a["data"]["actions"] for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")]
    assert [action["action"] for action in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == COMPOSITE
    [source] = manifest["ingredients"]  # the input, as the parent the edit was opened from
    assert source["relationship"] == "parentOf"
