"""
Hayhooks wrapper: `POST /image_generation_json/run` answers with the image in base64 JSON, for Hayhooks' CLI.

The JSON variant of `/image_generation/run`: the same pipeline instance, through the same serving layer (admission,
seeded cache, coalescing, progress), answered as Hayhooks answers a YAML pipeline (`result.text_to_image.images`).
It was the pipeline YAML deployed as is; Hayhooks runs a YAML pipeline itself, with nothing of the server around it,
so it became this wrapper of a few lines.
"""

from hayhooks import BasePipelineWrapper
from haystack.dataclasses import ImageContent
from image_generation_server.params import Guidance, ModelId, Seed, Size, Steps, Text

from components.request import OutputFormat
from image_generation_server.generation import served_runner
from image_generation_server.responses import http_error
from image_generation_server.settings import load_settings


class PipelineWrapper(BasePipelineWrapper):
    """Serves the native route's pipeline and answers with JSON."""

    skip_mcp = True  # the MCP door is image_generation_server/mcp.py

    def setup(self) -> None:
        """Share the process's runner: the native wrapper's pipeline (loaded from its folder if this comes first)."""
        self.runner = served_runner(load_settings())
        self.pipeline = self.runner.pipeline

    async def run_api_async(  # noqa: PLR0913
        self,
        prompt: Text,
        width: Size | None = None,
        height: Size | None = None,
        negative_prompt: Text | None = None,
        num_inference_steps: Steps | None = None,
        guidance_scale: Guidance | None = None,
        seed: Seed | None = None,
        model: ModelId | None = None,
        output_format: OutputFormat | None = None,
    ) -> dict[str, dict[str, list[ImageContent]]]:
        """
        Generate an image from a text prompt; the result is `{"text_to_image": {"images": [image]}}`.

        The image has `base64_image`, `mime_type` and `meta` (seed, size, model, format, ETag). Errors are those of
        `POST /image_generation/run`.

        Args:
            prompt: What to draw, 1 to 2000 characters.
            width: Width in pixels, a multiple of 8 from 64 to 2048; the pipeline's default when omitted.
            height: Height in pixels, a multiple of 8 from 64 to 2048; the pipeline's default when omitted.
            negative_prompt: What to keep out of the image, up to 2000 characters.
            num_inference_steps: Denoising steps, 1 to 150; the model's default when omitted.
            guidance_scale: Guidance scale, 0 to 50; the model's default when omitted.
            seed: Seed from 0 to 4294967295; the server picks one when omitted.
            model: Hugging Face Hub model id (`namespace/name`); the pipeline's default when omitted.
            output_format: `png`, `jpeg` or `webp`; the pipeline's default when omitted.

        """
        try:
            images = await self.runner.generate(
                prompt=prompt, width=width, height=height, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed, model=model,
                output_format=output_format,
            )  # fmt: skip
        except Exception as e:
            raise http_error(e) from None
        return {"text_to_image": {"images": images}}
