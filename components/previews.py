"""
Live previews of a local generation: the latents of a denoising step, decoded cheaply into a small image.

By default no extra weights are needed: a per-model linear projection of the latent channels to RGB (the
"latent2rgb" approximation of AUTOMATIC1111 and ComfyUI; the factors below are the ones ComfyUI publishes in
`comfy/latent_formats.py`, fitted on each family's VAE), one matrix product on a latent 1/8 of the image's size.
A model family it does not know gets a generic projection (its channels in three groups, each averaged, the result
stretched to the full range): colours are arbitrary, shapes still show. Optionally, a tiny autoencoder
(`AutoencoderTiny`, "TAESD") that the operator names decodes the latents instead: truer colours and detail, for a
few milliseconds on a GPU.

The previews read the latents and never write them, and draw no random numbers: the final image is the same bytes
with or without them.
"""

from typing import Any

from haystack.lazy_imports import LazyImport

with LazyImport(message="Run 'pip install \".[local]\"' to use the local diffusers backend.") as torch_import:
    import torch
    from PIL import Image

MAX_PREVIEWS = 3  # OpenAI's `partial_images` range is 0..3
PREVIEW_MAX_SIDE = 128  # a preview's long side at most; small enough for a job stream's 64 KB chunk in any format

# Rows: latent channels; columns: R, G, B. Then the bias added to each of R, G, B.
_SD15 = (
    ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177)),
    (0.0, 0.0, 0.0),
)
_SDXL = (
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
    (0.1084, -0.0175, -0.0011),
)
_SD3 = (
    (
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
    ),
    (0.2394, 0.2135, 0.1925),
)  # fmt: skip
_FLUX = (
    (
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)  # fmt: skip
# Pipeline class name fragment -> factors; the first that matches wins, SD 1.x/2.x is the 4-channel default.
LATENT_RGB = {"Flux": _FLUX, "StableDiffusion3": _SD3, "XL": _SDXL, "StableDiffusion": _SD15}


def preview_steps(total: int, count: int) -> frozenset[int]:
    """
    The steps (1-based) after which a preview is made: `count` evenly spaced ones, never the last step.

    Fewer when there are too few steps to space them (2 steps give at most one preview).
    """
    if count <= 0 or total <= 1:
        return frozenset()
    return frozenset(min(total - 1, max(1, round(total * k / (count + 1)))) for k in range(1, count + 1))


class LatentPreviewer:
    """Turns a pipeline's latents into a small RGB image: a linear projection, or a tiny autoencoder when given one."""

    def __init__(self, pipeline: Any, decoder: Any | None = None) -> None:
        """
        Pick the projection for `pipeline`'s latents, or use `decoder`.

        :param pipeline: The loaded diffusers pipeline whose latents are previewed (its class picks the factors).
        :param decoder: An `AutoencoderTiny` on the pipeline's device, or None for the linear projection.
        """
        torch_import.check()
        self.decoder = decoder
        self.packed = "Flux" in type(pipeline).__name__  # Flux denoises 2x2 patches of its latents, packed
        self.vae_scale = int(getattr(pipeline, "vae_scale_factor", 8))
        name = type(pipeline).__name__
        factors = next((value for key, value in LATENT_RGB.items() if key in name), None)
        channels = getattr(getattr(getattr(pipeline, "vae", None), "config", None), "latent_channels", None)
        if factors is not None and channels not in (None, len(factors[0])):
            factors = None  # a pipeline class with another autoencoder than its family's
        self.factors = factors

    def __call__(self, latents: "torch.Tensor", width: int, height: int) -> "Image.Image":
        """The first image of `latents` (the callback's tensor for a `width` x `height` image), at most 128 px."""
        with torch.no_grad():
            latent = self._unpacked(latents, width, height)[:1]
            if self.decoder is not None:
                rgb = self.decoder.decode(latent.to(self.decoder.dtype)).sample[0].float()  # in -1..1
            else:
                rgb = self._projected(latent[0].float())
            pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(pixels, "RGB")
        if max(image.size) > PREVIEW_MAX_SIDE:
            scale = PREVIEW_MAX_SIDE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return image

    def _unpacked(self, latents: "torch.Tensor", width: int, height: int) -> "torch.Tensor":
        """Latents as (batch, channels, h, w): Flux's packed (batch, patches, channels x 4) are unfolded."""
        if not self.packed or latents.ndim != 3:
            return latents
        rows, cols = 2 * (height // (self.vae_scale * 2)), 2 * (width // (self.vae_scale * 2))
        batch, _, packed = latents.shape
        unfolded = latents.view(batch, rows // 2, cols // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return unfolded.reshape(batch, packed // 4, rows, cols)

    def _projected(self, latent: "torch.Tensor") -> "torch.Tensor":
        """(channels, h, w) -> (3, h, w) in about -1..1."""
        if self.factors is not None:
            weights = torch.tensor(self.factors[0], dtype=latent.dtype, device=latent.device)
            bias = torch.tensor(self.factors[1], dtype=latent.dtype, device=latent.device)
            return torch.einsum("chw,cr->rhw", latent, weights) + bias[:, None, None]
        if latent.shape[0] < 3:
            latent = latent.repeat(3, 1, 1)
        rgb = torch.stack([group.mean(0) for group in torch.tensor_split(latent, 3)])
        low, high = rgb.amin(), rgb.amax()
        return (rgb - low) / (high - low).clamp_min(1e-6) * 2 - 1
