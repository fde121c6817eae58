"""`DiffusersImageToImage`: image-to-image and inpainting with the local diffusers model's loaded weights."""

from typing import Any

from haystack import component

from components.diffusers_text_to_image import DiffusersTextToImage, LoadedModel, torch_import
from components.errors import InvalidRequestError
from components.image_to_image_base import ImageToImageBase
from components.request import EditRequest, GenerationRequest

with torch_import:
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

# The pipeline steps that diffusers' img2img and inpainting run when a request sets none (their default).
DEFAULT_PIPELINE_STEPS = 50


@component
class DiffusersImageToImage(ImageToImageBase, DiffusersTextToImage):
    """
    Edits images with the local diffusers model: image-to-image, or inpainting when a mask is given.

    Its settings are those of `DiffusersTextToImage`, and it shares that component's loaded model: the editing
    pipelines are built on the same weights with diffusers' `from_pipe` (no second copy in memory), and run on the same
    device queue, seeded, with per-step progress, stopping at the next step when cancelled or past the deadline.
    Outside the mask, every pixel of the result is the source's.

    Usage:
    ```python
    editor = DiffusersImageToImage(model="stabilityai/sd-turbo")
    editor.warm_up()
    source = ImageContent.from_file_path("cat.png")
    image = editor.run(image=source, prompt="A tiger", strength=0.6, num_inference_steps=4)["images"][0]
    ```
    """

    def _check(self, request: GenerationRequest) -> None:
        DiffusersTextToImage._check(self, request)  # @component rebuilds the class: no super()
        assert isinstance(request, EditRequest)
        steps = request.num_inference_steps or DEFAULT_PIPELINE_STEPS
        if int(steps * request.strength) < 1:
            raise InvalidRequestError(
                f"strength={request.strength} leaves no denoising step of {steps}: "
                "raise strength or num_inference_steps so that their product is at least 1"
            )

    def _pipeline_for(self, loaded: LoadedModel, request: GenerationRequest, kwargs: dict[str, Any]) -> Any:
        assert isinstance(request, EditRequest) and request.image is not None
        task = "inpaint" if request.mask is not None else "img2img"
        pipeline = loaded.derived.get(task)
        if pipeline is None:  # under the device lock: built once
            auto = AutoPipelineForInpainting if task == "inpaint" else AutoPipelineForImage2Image
            pipeline = loaded.derived[task] = auto.from_pipe(loaded.pipeline)
            pipeline.set_progress_bar_config(disable=True)
        kwargs.update(image=request.image.pixels, strength=request.strength)
        if request.mask is not None:
            kwargs["mask_image"] = request.mask.pixels
        else:  # img2img takes the size of its image
            del kwargs["width"], kwargs["height"]
        return pipeline
