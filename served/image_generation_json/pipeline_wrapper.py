"""
Hayhooks wrapper: `POST /image_generation_json/run` answers with the image in base64 JSON, for Hayhooks' CLI.

The JSON variant of `/image_generation/run`: the same pipeline instance, through the same serving layer (admission,
seeded cache, coalescing, progress), answered as Hayhooks answers a YAML pipeline (`result.text_to_image.images`).
It was the pipeline YAML deployed as is; Hayhooks runs a YAML pipeline itself, with nothing of the server around it,
so it became this wrapper of a few lines.
"""

from typing import Any

from hayhooks import BasePipelineWrapper
from haystack.dataclasses import ImageContent

from components.request import GenerationParameters
from image_generation_server import answers
from image_generation_server.generation import image_size, served_runner
from image_generation_server.responses import http_error
from image_generation_server.settings import current_settings
from image_generation_server.signature import takes


class PipelineWrapper(BasePipelineWrapper):
    """Serves the native route's pipeline and answers with JSON."""

    skip_mcp = True  # the MCP door is image_generation_server/mcp.py

    def setup(self) -> None:
        """Share the process's runner: the native wrapper's pipeline (loaded from its folder if this comes first)."""
        self.runner = served_runner(current_settings())
        self.pipeline = self.runner.pipeline

    @takes(GenerationParameters)
    async def run_api_async(self, **params: Any) -> dict[str, dict[str, list[ImageContent]]]:
        """
        Generate an image from a text prompt; the result is `{"text_to_image": {"images": [image]}}`.

        The image has `base64_image`, `mime_type` and `meta` (seed, size, model, format, ETag). A parameter left out
        takes the pipeline's default. Errors are those of `POST /image_generation/run`.
        """
        try:
            size = image_size(self.pipeline, params.get("width"), params.get("height"))
            share = answers.reserve(1, *size, copies=answers.JSON_COPIES)
            images = await self.runner.generate(**params)
        except Exception as e:
            raise http_error(e) from None
        share.hold(images)
        return {"text_to_image": {"images": images}}
