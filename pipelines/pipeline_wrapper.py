"""
Hayhooks wrapper: `POST /image_generation/run` answers with the image itself.

In Hayhooks' durable mode the wrapper also runs jobs (`POST /image_generation/run-durable`, see
`image_generation_server.jobs`). A wrapper with a durable run cannot be loaded by a live server, so the durable class
is chosen here, at import, from Hayhooks' settings: one folder serves both modes.
"""

from pathlib import Path
from typing import Any

from fastapi import Response
from hayhooks import BasePipelineWrapper
from hayhooks.settings import settings as hayhooks_settings
from starlette.datastructures import Headers

from components.request import GenerationParameters
from image_generation_server import answers
from image_generation_server.generation import image_size, served_runner
from image_generation_server.jobs import jobs_mixin
from image_generation_server.responses import http_error, image_response
from image_generation_server.settings import current_settings
from image_generation_server.signature import takes


class LivePipelineWrapper(BasePipelineWrapper):
    """Serves the configured backend's pipeline; the image bytes go out as the response body, never through a file."""

    # Hayhooks' own MCP tool would answer `str(Response)`: image_generation_server.mcp serves the image to MCP clients.
    skip_mcp = True

    def setup(self) -> None:
        """Load and warm up the backend's pipeline (a YAML beside this file), with the server's layer around it."""
        self.runner = served_runner(current_settings(), Path(__file__).parent)
        self.pipeline = self.runner.pipeline

    @takes(GenerationParameters)
    async def run_api_async(self, headers: Headers | None = None, **params: Any) -> Response:
        """
        Generate an image from a text prompt and return it as the response body.

        One image per call: for several at once (`n`), use `POST /v1/images/generations` or the MCP tool. A parameter
        left out takes the pipeline's default (the component's init parameters in the pipeline YAML).

        The response carries `X-Seed` (the seed used; pass it back to reproduce the image) and `ETag` (answered with
        304 on a matching `If-None-Match`). The image is marked as AI-generated (IPTC digital source type in XMP; C2PA
        Content Credentials when the server signs).
        Errors: 401 missing API key (when keys are configured), 413 body over 64 KB, 422 bad input or unknown field
        (nothing is sent upstream), 429/503 with `Retry-After`, 502 upstream failure, 504 upstream timeout.
        """
        try:
            width, height = image_size(self.pipeline, params.get("width"), params.get("height"))
            share = answers.reserve(1, width, height, copies=2)  # the image's base64, and its bytes as the body
            [image] = await self.runner.generate(**params)
        except Exception as e:
            raise http_error(e) from None
        share.hold([image])
        return image_response(image, headers)


class DurablePipelineWrapper(jobs_mixin(), LivePipelineWrapper):
    """The same routes, plus jobs: `/run-durable`, `executions/{id}` (with `/stream` and `/cancel`)."""


PipelineWrapper = DurablePipelineWrapper if hayhooks_settings.durable_mode else LivePipelineWrapper
