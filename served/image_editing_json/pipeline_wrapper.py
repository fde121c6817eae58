"""
Hayhooks wrapper: `POST /image_editing_json/run` edits a base64 image (by a mask, if given), answers in JSON.

The JSON variant of `/image_editing/run`: the editing pipeline loaded as that wrapper loads it (the operator's
settings applied to its init parameters, `image_generation_server.generation.load_pipeline`), through the same
admission gate, answered as Hayhooks answers a YAML pipeline (`result.image_to_image.images`). It was the pipeline
YAML deployed as is; Hayhooks runs a YAML pipeline itself, with none of the server's settings, so it became this
wrapper of a few lines.
"""

from pathlib import Path
from typing import Any

from hayhooks import BasePipelineWrapper
from hayhooks.settings import settings as hayhooks_settings
from haystack.dataclasses import ImageContent

from components.request import EditInputs
from image_generation_server import answers
from image_generation_server.generation import (
    EDIT_PIPELINE_FILES,
    EDIT_PIPELINE_NAME,
    edit_images,
    edit_size,
    load_pipeline,
    served_runner,
)
from image_generation_server.responses import http_error
from image_generation_server.settings import current_settings
from image_generation_server.signature import takes


class PipelineWrapper(BasePipelineWrapper):
    """Serves the configured backend's editing pipeline and answers with JSON."""

    skip_mcp = True  # image_generation_server.mcp serves edits to MCP clients (`edit_image`)

    def setup(self) -> None:
        """Load the editing pipeline from the native editing wrapper's folder; share the process's admission gate."""
        settings = current_settings()
        self.runner = served_runner(settings)
        folder = Path(hayhooks_settings.pipelines_dir) / EDIT_PIPELINE_NAME
        self.pipeline = load_pipeline(folder, settings, EDIT_PIPELINE_FILES)
        self.pipeline.warm_up()

    @takes(EditInputs)
    async def run_api_async(self, **params: Any) -> dict[str, dict[str, list[ImageContent]]]:
        """
        Edit an image from a text prompt; the result is `{"image_to_image": {"images": [image]}}`.

        With a mask, only where it is transparent. Errors are those of `POST /image_editing/run`.
        """
        try:
            size = await edit_size(self.pipeline, **params)
            share = answers.reserve(1, *size, copies=answers.JSON_COPIES)
            images = await edit_images(self.runner, self.pipeline, **params)
        except Exception as e:
            raise http_error(e) from None
        share.hold(images)
        return {"image_to_image": {"images": images}}
