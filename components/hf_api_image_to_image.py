"""`HuggingFaceAPIImageToImage`: image editing through Hugging Face Inference Providers or an inference endpoint."""

from typing import Any

from haystack import component

from components.hf_api_text_to_image import HuggingFaceAPITextToImage
from components.hf_providers import EDIT_TASK, edit_calls
from components.image_to_image_base import ImageToImageBase
from components.request import EditRequest, GenerationRequest


@component
class HuggingFaceAPIImageToImage(ImageToImageBase, HuggingFaceAPITextToImage):
    """
    Edits images with the Hugging Face Inference API's `image-to-image` task.

    Its settings, transport and limits are those of `HuggingFaceAPITextToImage`: the same bounded, SSRF-checked
    calls, the same token rules. Providers take the source image (sent as a PNG of the requested size, never the
    uploaded bytes) and the prompt, `strength` and seed; none takes a mask, so a mask is applied here, on the reply:
    outside it, every pixel of the result is the source's.

    Usage:
    ```python
    editor = HuggingFaceAPIImageToImage(model="black-forest-labs/FLUX.1-Kontext-dev")
    source = ImageContent.from_file_path("cat.png")
    image = editor.run(image=source, prompt="The cat wears a red hat", seed=42)["images"][0]
    ```
    """

    task = EDIT_TASK

    def _calls(self, request: GenerationRequest) -> Any:
        assert self._target is not None and self.settings is not None and isinstance(request, EditRequest)
        return edit_calls(self._target, self._mappings, request, self.settings.max_image_bytes)
