"""
Image bytes: recognise them, convert them only when asked for another format, and tag PNGs with their parameters.

Pixels are decoded at most once per image, and not at all when the upstream already sent the requested format:
the parameters text chunk is spliced in at chunk level.
"""

import struct
import zlib
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from components.errors import InvalidImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(PNG_SIGNATURE) + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
# Encoder settings chosen in bench/: fast PNG deflate, visually lossless JPEG/WebP.
_ENCODE_OPTIONS = {
    "png": {"compress_level": 1},
    "jpeg": {"quality": 90},
    "webp": {"quality": 90, "method": 0},
}


def sniff(data: bytes) -> tuple[str, int, int]:
    """Return (format, width, height) of a PNG, JPEG or WebP by reading its header only."""
    try:
        with Image.open(BytesIO(data)) as image:
            fmt = _PIL_FORMATS.get(image.format or "")
            size = image.size
    except Image.DecompressionBombError as e:
        raise InvalidImageError("the upstream image declares too many pixels") from e
    except (UnidentifiedImageError, OSError, ValueError, struct.error) as e:
        raise InvalidImageError("the upstream reply is not an image") from e
    if fmt is None:
        raise InvalidImageError("the upstream image is not PNG, JPEG or WebP")
    if fmt == "png" and not data.endswith(b"IEND\xaeB`\x82"):
        raise InvalidImageError("the upstream PNG is truncated")
    return fmt, size[0], size[1]


def convert(data: bytes, output_format: str) -> bytes:
    """Decode once and encode as `output_format`."""
    try:
        with Image.open(BytesIO(data)) as image:
            image.load()
            return encode(image, output_format)
    except (Image.DecompressionBombError, OSError, ValueError, struct.error) as e:
        raise InvalidImageError("the upstream image could not be decoded") from e


def encode(image: Image.Image, output_format: str) -> bytes:
    """Encode decoded pixels as `output_format` with the settings chosen in bench/."""
    if output_format == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = BytesIO()
    image.save(out, format=output_format.upper(), **_ENCODE_OPTIONS[output_format])
    return out.getvalue()


def with_png_text(png: bytes, keyword: str, text: str) -> bytes:
    """Insert a text chunk right after IHDR; tEXt when the text is Latin-1, else uncompressed UTF-8 iTXt."""
    try:
        chunk_type, body = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        chunk_type, body = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))
    return png[:_IHDR_END] + chunk + png[_IHDR_END:]
