"""`AIImageMarker`: marks images as AI-generated (IPTC digital source type in XMP), optionally signed with C2PA."""

import asyncio
from pathlib import Path
from typing import Any

import pybase64
from haystack import component, default_from_dict, default_to_dict
from haystack.dataclasses import ImageContent

from components.image_codec import sniff
from components.image_input import read_image
from components.provenance import Provenance, ProvenanceSettings
from components.request import EditRequest, GenerationRequest
from components.urls import is_http_url

PROMPTS = ("prompt", "negative_prompt")  # meta a text-to-image component gives its images, read and dropped here


@component
class AIImageMarker:
    """
    Replaces the metadata of generated images with a statement that a trained model made them, and what model.

    An edit (an image whose meta has the `strength` an image-to-image component gives it) is marked as a composite
    with generated content, and its C2PA manifest names the source image (`source`) as its parent ingredient.

    Whatever metadata the image came with (text chunks, EXIF, XMP, another party's C2PA manifest) is dropped; the
    pixel data is kept byte for byte. The XMP says `trainedAlgorithmicMedia` (IPTC), the model (`AISystemUsed`) and
    this service (`CreatorTool`). With `embed_parameters`, the prompt and the generation parameters go in too (PNG
    `parameters` text chunk as AUTOMATIC1111 writes it, XMP prompt, C2PA action parameters). With a certificate and a
    key, each image is signed with C2PA Content Credentials.

    Usage, after a text-to-image component:
    ```python
    pipeline.add_component("text_to_image", HuggingFaceAPITextToImage())
    pipeline.add_component("ai_image_marker", AIImageMarker())
    pipeline.connect("text_to_image.images", "ai_image_marker.images")
    ```
    """

    def __init__(
        self,
        embed_parameters: bool = False,
        c2pa_cert: str | None = None,
        c2pa_key: str | None = None,
        c2pa_tsa_url: str | None = None,
    ) -> None:
        """
        Create the marker; certificates are read and checked in `warm_up()`.

        :param embed_parameters: Put the prompt and the generation parameters into every image.
        :param c2pa_cert: Path of the PEM certificate chain that signs C2PA Content Credentials (the `c2pa` extra);
            `None`: no signing.
        :param c2pa_key: Path of the PEM private key of that certificate (a file, never the key itself).
        :param c2pa_tsa_url: An RFC 3161 timestamp authority for the signatures, or `None`.
        """
        if c2pa_key is not None and c2pa_key.lstrip().startswith("-----"):  # never echoed: it is the key itself
            raise ValueError("c2pa_key must be the path of a key file (or a Docker secret), not a key")
        if (c2pa_cert is None) != (c2pa_key is None):
            raise ValueError("c2pa_cert and c2pa_key must be set together")
        if c2pa_tsa_url is not None and not is_http_url(c2pa_tsa_url):
            raise ValueError(f"c2pa_tsa_url={c2pa_tsa_url!r} must be an http(s) URL with a host")
        self.embed_parameters = embed_parameters
        self.c2pa_cert = c2pa_cert
        self.c2pa_key = c2pa_key
        self.c2pa_tsa_url = c2pa_tsa_url
        self._provenance: Provenance | None = None

    def warm_up(self) -> None:
        """
        Load and check the signing credentials, when set, by signing a probe image. Idempotent.

        :raises ValueError: The certificate or key is missing, unreadable, expired, mismatched or refused by c2pa.
        """
        if self._provenance is None:
            self._provenance = Provenance(
                ProvenanceSettings(
                    embed_parameters=self.embed_parameters,
                    c2pa_cert=Path(self.c2pa_cert) if self.c2pa_cert is not None else None,
                    c2pa_key=Path(self.c2pa_key) if self.c2pa_key is not None else None,
                    c2pa_tsa_url=self.c2pa_tsa_url,
                )
            )

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component."""
        return default_to_dict(
            self,
            embed_parameters=self.embed_parameters,
            c2pa_cert=self.c2pa_cert,
            c2pa_key=self.c2pa_key,
            c2pa_tsa_url=self.c2pa_tsa_url,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AIImageMarker":
        """Deserialize the component."""
        return default_from_dict(cls, data)

    @component.output_types(images=list[ImageContent])
    def run(self, images: list[ImageContent], source: ImageContent | None = None) -> dict[str, list[ImageContent]]:
        """
        Mark each image.

        :param images: PNG, JPEG or WebP images, with the meta a text-to-image component gives them (`prompt`,
            `negative_prompt`, `model`, `seed`, `num_inference_steps`, `guidance_scale`, `format`, `width`,
            `height`; `strength` for an edit). The prompts are embedded only with `embed_parameters`.
        :param source: For edits, the image edited: the C2PA parent ingredient of each signed edit.
        :returns: `images`: the marked images, in the same order, with the same meta less the prompts (which the
            images carry only with `embed_parameters`, and which a cache or a door then never keeps).
        :raises InvalidImageError: An image's structure is broken.
        :raises SigningError: C2PA signing failed.
        """
        self.warm_up()
        return {"images": [self._mark(image, source) for image in images]}

    @component.output_types(images=list[ImageContent])
    async def run_async(
        self, images: list[ImageContent], source: ImageContent | None = None
    ) -> dict[str, list[ImageContent]]:
        """Like `run`; signing runs off the event loop. Parameters, returns and errors are those of `run`."""
        self.warm_up()
        assert self._provenance is not None
        if self._provenance.signer is None:  # a few hundred bytes spliced in: cheaper than a hand-off to a thread
            return {"images": [self._mark(image, source) for image in images]}
        return {"images": [await asyncio.to_thread(self._mark, image, source) for image in images]}

    def _mark(self, image: ImageContent, source: ImageContent | None) -> ImageContent:
        assert self._provenance is not None
        meta = image.meta
        if self._provenance.signer is None and {"format", "width", "height"} <= meta.keys():
            # A text-to-image component's: nothing to parse or sign, so the base64 text is spliced, not decoded.
            size = (meta["width"], meta["height"])
            request = self._request(meta, meta["format"], size, source)
            encoded = self._provenance.mark_base64(image.base64_image, request, size)
        else:
            data = pybase64.b64decode(image.base64_image, validate=True)
            image_format, width, height = sniff(data)
            request = self._request(meta, image_format, (width, height), source)
            encoded = pybase64.b64encode_as_string(self._provenance.mark(data, request, (width, height)))
        kept = {name: value for name, value in meta.items() if name not in PROMPTS}  # in the image only if embedded
        return ImageContent(base64_image=encoded, mime_type=image.mime_type, meta=kept, validation=False)

    def _request(
        self, meta: dict[str, Any], image_format: str, size: tuple[int, int], source: ImageContent | None
    ) -> GenerationRequest:
        """What the image's meta says it was made from (an `EditRequest` for an edit, its source when signing)."""
        assert self._provenance is not None
        width, height = size
        values: dict[str, Any] = {
            "prompt": meta.get("prompt") or "", "negative_prompt": meta.get("negative_prompt"), "width": width,
            "height": height, "num_inference_steps": meta.get("num_inference_steps"),
            "guidance_scale": meta.get("guidance_scale"), "seed": meta.get("seed", 0),
            "model": meta.get("model", "unknown"), "output_format": image_format,
        }  # fmt: skip
        if "strength" not in meta:
            return GenerationRequest(**values)
        parent = None  # an edit: its source is the signed image's parent
        if source is not None and self._provenance.signer is not None:
            # A YAML pipeline served by Hayhooks receives its JSON inputs as dicts.
            encoded = source["base64_image"] if isinstance(source, dict) else source.base64_image
            parent = read_image(pybase64.b64decode(encoded, validate=True), "source")
            parent = parent.resized(size) if parent.size != size else parent
        return EditRequest(**values, strength=meta["strength"], image=parent)
