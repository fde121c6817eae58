"""
Hayhooks wrapper: `POST /image_editing/run` edits an uploaded image and answers with the edited image itself.

The request is a multipart form, as Hayhooks takes files: `files` holds the image, then optionally the mask. In
Hayhooks' durable mode the wrapper also runs edit jobs (`POST /image_editing/run-durable`, see
`image_generation_server.jobs`), chosen at import as for the generation wrapper.
"""

from pathlib import Path
from typing import Any

from fastapi import HTTPException, Response, UploadFile
from hayhooks import BasePipelineWrapper
from hayhooks.settings import settings as hayhooks_settings
from starlette.datastructures import Headers

from components.request import EditParameters
from image_generation_server import answers
from image_generation_server.generation import (
    EDIT_PIPELINE_FILES,
    edit_images,
    edit_size,
    load_pipeline,
    served_runner,
)
from image_generation_server.jobs import EditJobs, jobs_mixin
from image_generation_server.responses import http_error, image_response
from image_generation_server.settings import current_settings
from image_generation_server.signature import takes
from image_generation_server.uploads import form_model, image_content


class LivePipelineWrapper(BasePipelineWrapper):
    """Serves the configured backend's editing pipeline; the image bytes go out as the response body."""

    skip_mcp = True  # image_generation_server.mcp serves edits to MCP clients (`edit_image`)

    def setup(self) -> None:
        """Load and warm up the backend's editing pipeline (for the local backend: on the weights already loaded)."""
        settings = current_settings()
        self.runner = served_runner(settings)  # its admission gate is the one every generation passes
        self.pipeline = load_pipeline(Path(__file__).parent, settings, EDIT_PIPELINE_FILES)
        self.pipeline.warm_up()

    @takes(form_model(EditParameters))
    async def run_api_async(self, files: list[UploadFile], headers: Headers | None = None, **params: Any) -> Response:
        """
        Edit an image from a text prompt and return the edited image as the response body.

        A multipart form: `files` is the image (PNG, JPEG or WebP), then optionally the mask (a PNG or WebP of the
        image's size whose fully transparent pixels mark what to change; every other pixel of the answer is the
        image's own). Without a mask the whole image is edited. One image per call: for several (`n`), use
        `POST /v1/images/edits` or the MCP tool. Like `/image_generation/run`, the answer carries `X-Seed` and
        `ETag`; the image is marked as an edit with generated content (IPTC `compositeWithTrainedAlgorithmicMedia`;
        a C2PA `c2pa.edited` action when the server signs).
        Errors: 401 missing API key (when keys are configured), 413 body over the upload cap, 422 bad input, an
        upload that is not a PNG, JPEG or WebP, truncated, too large, or a mask of another size or with no alpha
        (nothing is sent upstream), 429/503 with `Retry-After`, 502 upstream failure, 504 upstream timeout.
        """
        if not 1 <= len(files) <= 2:
            raise HTTPException(422, "files: send the image, and optionally the mask (one or two files)")
        image, mask = [image_content(await upload.read()) for upload in files] + [None] * (2 - len(files))
        try:
            size = await edit_size(self.pipeline, image=image, mask=mask, **params)
            share = answers.reserve(1, *size, copies=2)  # the image's base64, and its bytes as the body
            [edited] = await edit_images(self.runner, self.pipeline, image=image, mask=mask, **params)
        except Exception as e:
            raise http_error(e) from None
        share.hold([edited])
        return image_response(edited, headers)


class DurablePipelineWrapper(jobs_mixin(EditJobs), LivePipelineWrapper):
    """The same route, plus edit jobs: `/image_editing/run-durable`, `executions/{id}` (`/stream`, `/cancel`)."""


PipelineWrapper = DurablePipelineWrapper if hayhooks_settings.durable_mode else LivePipelineWrapper
