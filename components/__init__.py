"""Haystack components that turn text into images, and the pieces they share."""

from components.ai_image_marker import AIImageMarker
from components.errors import ImageGenerationError
from components.hf_api_text_to_image import HuggingFaceAPITextToImage

__all__ = ["AIImageMarker", "HuggingFaceAPITextToImage", "ImageGenerationError"]
