"""Haystack components that turn text into images, and the pieces they share."""

from components.errors import ImageGenerationError
from components.hf_api_text_to_image import HuggingFaceAPITextToImage

__all__ = ["HuggingFaceAPITextToImage", "ImageGenerationError"]
