"""Live previews of the local backend: when they come, what they show, and that the final image never changes."""

import base64
import io
import sys

import pytest
import torch
from conftest import ROOT
from diffusers import AutoencoderTiny
from PIL import Image

from components.diffusers_text_to_image import DiffusersTextToImage
from components.previews import LATENT_RGB, PREVIEW_MAX_SIDE, LatentPreviewer, preview_steps

sys.path.insert(0, str(ROOT / "scripts"))
from tiny_diffusers import build

STEPS = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    """A random-weight `AutoencoderTiny` (TAESD's shape, much smaller), saved as an operator would point to it."""
    torch.manual_seed(0)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4, upsampling_scaling_factor=2,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("models") / "tiny-taesd"
    decoder.save_pretrained(folder)
    return folder


def generator(model, **kwargs):
    component = DiffusersTextToImage(model=str(model), width=64, height=64, num_inference_steps=STEPS, **kwargs)
    component.warm_up()
    return component


def run_with_previews(component, previews, **params):
    events = []
    params = {"prompt": "a lighthouse", "seed": 7, "progress_callback": events.append, "previews": previews, **params}
    [image] = component.run(**params)["images"]
    return image, [event for event in events if event["phase"] == "preview"]


@pytest.mark.parametrize(
    ("total", "count", "steps"),
    [(12, 3, {3, 6, 9}), (6, 3, {2, 3, 4}), (2, 2, {1}), (1, 3, set()), (30, 0, set()), (4, 3, {1, 2, 3})],
)
def test_preview_steps_are_evenly_spaced_and_never_the_last(total, count, steps):
    assert preview_steps(total, count) == steps


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_previews_come_at_their_steps_and_leave_the_image_alone(tiny_model, output_format):
    component = generator(tiny_model)
    plain = component.run(prompt="a lighthouse", seed=7, output_format=output_format)["images"][0]
    image, previews = run_with_previews(component, 3, output_format=output_format)

    assert image.base64_image == plain.base64_image  # same seed, same bytes, previews or not
    assert [(e["index"], e["step"], e["steps"], e["previews"]) for e in previews] == [
        (0, 2, STEPS, 3), (1, 3, STEPS, 3), (2, 4, STEPS, 3)
    ]  # fmt: skip
    for event in previews:
        picture = Image.open(io.BytesIO(base64.b64decode(event["image"])))
        assert picture.format.lower() == output_format
        assert event["mime_type"] == f"image/{output_format}"
        latent_side = 64 // component._loaded.pipeline.vae_scale_factor  # 1/2 for the tiny model, 1/8 for real ones
        assert picture.size == (event["width"], event["height"]) == (latent_side, latent_side)
    assert len({event["image"] for event in previews}) == 3  # the picture changes as it denoises


def test_no_previews_unless_asked(tiny_model):
    component = generator(tiny_model)
    _, previews = run_with_previews(component, 0)
    assert previews == []
    events = []
    component.run(prompt="a lighthouse", seed=7, progress_callback=events.append)
    assert [event for event in events if event["phase"] == "preview"] == []
    assert [event["step"] for event in events if event["phase"] == "step"] == list(range(1, STEPS + 1))


def test_a_tiny_autoencoder_decodes_the_previews_when_configured(tiny_model, tiny_decoder):
    component = generator(tiny_model, preview_decoder=str(tiny_decoder))
    plain = generator(tiny_model)
    image, previews = run_with_previews(component, 2, width=128, height=96)
    linear_image, linear = run_with_previews(plain, 2, width=128, height=96)

    assert image.base64_image == linear_image.base64_image
    assert [e["step"] for e in previews] == [e["step"] for e in linear] == [2, 4]
    # The decoder draws the image's size (at most 128 px), the projection the latent's (1/2 for the tiny model).
    assert {(e["width"], e["height"]) for e in previews} == {(PREVIEW_MAX_SIDE, 96)}
    assert {(e["width"], e["height"]) for e in linear} == {(64, 48)}
    assert component.to_dict()["init_parameters"]["preview_decoder"] == str(tiny_decoder)


def test_a_missing_decoder_folder_is_a_clear_error(tiny_model, tmp_path):
    component = DiffusersTextToImage(model=str(tiny_model), preview_decoder=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"preview decoder folder .*absent does not exist"):
        component.warm_up()


class _Named:
    """Stands for a pipeline of the named class: the previewer reads the class name and the VAE's channels only."""

    def __init__(self, name, channels):
        self.__class__ = type(name, (), {})
        self.vae = type("Vae", (), {"config": type("Config", (), {"latent_channels": channels})()})()
        self.vae_scale_factor = 8


@pytest.mark.parametrize(
    ("name", "channels", "factors"),
    [
        ("StableDiffusionPipeline", 4, LATENT_RGB["StableDiffusion"]),
        ("StableDiffusionXLPipeline", 4, LATENT_RGB["XL"]),
        ("StableDiffusion3Pipeline", 16, LATENT_RGB["StableDiffusion3"]),
        ("FluxPipeline", 16, LATENT_RGB["Flux"]),
        ("SanaPipeline", 32, None),
        ("StableDiffusionPipeline", 8, None),  # a 4-channel family with another autoencoder: the generic projection
    ],
)
def test_each_family_gets_its_projection(name, channels, factors):
    previewer = LatentPreviewer(_Named(name, channels))
    assert previewer.factors == factors
    packed = name.startswith("Flux")
    # Flux denoises packed 2x2 patches: (batch, patches, channels x 4); a 128x64 image has 8 x 4 of them.
    latents = torch.randn(1, 32, channels * 4) if packed else torch.randn(1, channels, 8, 16)
    image = previewer(latents, 128, 64)
    assert image.size == (16, 8)
    assert image.mode == "RGB"


def test_flux_patches_are_unpacked_in_place():
    previewer = LatentPreviewer(_Named("FluxPipeline", 16))
    latents = torch.zeros(1, 16, 8, 8)
    latents[0, :, 0, 7] = 1.0  # one latent pixel, top right
    packed = latents.view(1, 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 64)  # as diffusers packs
    assert torch.equal(previewer._unpacked(packed, 64, 64), latents)
