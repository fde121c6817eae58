"""
What an image says about where it comes from: the IPTC digital source type in XMP, and C2PA Content Credentials.

`AIImageMarker` (`components.ai_image_marker`) puts them in. The XMP costs a few hundred bytes. The prompt and the
generation parameters go in only when `embed_parameters` is on. Images are signed with C2PA when a certificate and
key are configured.
"""

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from components.c2pa_signer import PARENT_LABEL, C2paSigner
from components.image_codec import replace_metadata, replace_metadata_base64
from components.request import EditRequest, GenerationRequest

SERVICE_NAME = "hayhooks-image-generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# An edit: the client's image with a generated part (all of it without a mask) composited in.
COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA = (
    "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
)
PARAMETERS_KEYWORD = "parameters"  # AUTOMATIC1111's PNG text chunk
_XML_TEXT = {'"': "&quot;", "\r": "&#13;"}
# What XML 1.0 cannot hold, even escaped: C0 controls other than tab, newline and return, surrogates, U+FFFE, U+FFFF.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def service_version() -> str:
    """The installed version of this service."""
    try:
        return importlib.metadata.version(SERVICE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ProvenanceSettings:
    """What goes into every image besides its pixels."""

    embed_parameters: bool
    c2pa_cert: Path | None
    c2pa_key: Path | None
    c2pa_tsa_url: str | None


class Provenance:
    """Replaces an image's metadata with ours and signs it; built once per marker, in `warm_up()`."""

    def __init__(self, settings: ProvenanceSettings) -> None:
        """
        Load the signer when one is configured.

        :raises ValueError: The certificate or key is missing, unreadable, expired, mismatched or refused by c2pa.
        """
        self.settings = settings
        self.version = service_version()
        self.signer = (
            C2paSigner(
                settings.c2pa_cert, settings.c2pa_key, settings.c2pa_tsa_url, c2pa_manifest(self.version, "probe", None)
            )
            if settings.c2pa_cert is not None and settings.c2pa_key is not None
            else None
        )

    def mark(self, data: bytes, request: GenerationRequest, size: tuple[int, int]) -> bytes:
        """Strip the upstream's metadata, insert ours, then sign: the bytes every door serves and the cache keeps."""
        data = replace_metadata(data, request.output_format, size, *self._metadata(request))
        if self.signer is not None:
            parent = request.image.png() if isinstance(request, EditRequest) and request.image is not None else None
            data = self.signer.sign(data, request.output_format, self.manifest(request), parent)
        return data

    def mark_base64(self, text: str, request: GenerationRequest, size: tuple[int, int]) -> str:
        """`mark` on an image's base64 text, when nothing signs: the metadata spliced in, the pixels' text copied."""
        assert self.signer is None, "signing needs the bytes: mark()"
        return replace_metadata_base64(text, request.output_format, size, *self._metadata(request))

    def _metadata(self, request: GenerationRequest) -> tuple[bytes, tuple[str, str] | None]:
        """The XMP packet, and the PNG `parameters` text when embedding them is on."""
        embed = self.settings.embed_parameters
        png_text = (PARAMETERS_KEYWORD, request.parameters_text()) if embed else None
        xmp = xmp_packet(
            f"{SERVICE_NAME} {self.version}", request.model, request.prompt if embed else None, source_type(request)
        )
        return xmp, png_text

    def manifest(self, request: GenerationRequest) -> dict[str, Any]:
        """The C2PA manifest of this image; the parameters are in it only when embedding them is on."""
        parameters = None
        if self.settings.embed_parameters:
            parameters = vars(request)
            if isinstance(request, EditRequest):
                parameters = {**request.generation_values(), "strength": request.strength}
        return c2pa_manifest(self.version, request.model, parameters, edited=isinstance(request, EditRequest))


def source_type(request: GenerationRequest) -> str:
    """The IPTC digital source type of the image `request` makes: generated, or an edit with generated content."""
    return COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if isinstance(request, EditRequest) else TRAINED_ALGORITHMIC_MEDIA


def c2pa_manifest(
    version: str, model: str, parameters: dict[str, Any] | None, *, edited: bool = False
) -> dict[str, Any]:
    """
    A C2PA manifest with one action by a trained model: this service, the model, the parameters.

    The action is `c2pa.created` for a generated image. An edit has two: `c2pa.opened` of its source (the signer
    adds the source as the `parentOf` ingredient that this action names), then `c2pa.edited` with the digital source
    type of a composite with generated content.
    """
    action: dict[str, Any] = {
        "action": "c2pa.edited" if edited else "c2pa.created",
        "digitalSourceType": COMPOSITE_WITH_TRAINED_ALGORITHMIC_MEDIA if edited else TRAINED_ALGORITHMIC_MEDIA,
        "softwareAgent": {"name": model},
    }
    if parameters is not None:
        action["parameters"] = {name: value for name, value in parameters.items() if value is not None}
    opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": [PARENT_LABEL]}}
    actions = [opened, action] if edited else [action]
    return {
        "claim_generator_info": [{"name": SERVICE_NAME, "version": version}],
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": actions}}],
    }


def xmp_packet(
    creator_tool: str, model: str, prompt: str | None, digital_source_type: str = TRAINED_ALGORITHMIC_MEDIA
) -> bytes:
    """An XMP packet saying the image was made by a trained model (IPTC digital source type), by what, and from what."""
    prompt_xml = (
        f"<Iptc4xmpExt:AIPromptInformation>{xml_text(prompt)}</Iptc4xmpExt:AIPromptInformation>"
        if prompt is not None
        else ""
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        ' xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
        f' Iptc4xmpExt:DigitalSourceType="{digital_source_type}"'
        f' Iptc4xmpExt:AISystemUsed="{xml_text(model)}"'
        f' xmp:CreatorTool="{xml_text(creator_tool)}">'
        f"{prompt_xml}"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


def xml_text(value: str) -> str:
    """`value` escaped for XML text or an attribute, each character XML cannot hold (U+FFFE, U+FFFF) as U+FFFD."""
    return escape(_NOT_XML_CHAR.sub("\ufffd", value), _XML_TEXT)
