"""
Image bytes: recognise them, convert them only when asked for another format, and replace their metadata.

Pixels are decoded at most once per image, and not at all when the upstream already sent the requested format:
metadata (XMP, the PNG parameters text) is spliced in at chunk or segment level, the pixel data kept byte for byte.
"""

import struct
import zlib
from collections.abc import Iterator
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from components.errors import InvalidImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(PNG_SIGNATURE) + 8 + 13 + 4  # signature, IHDR length+type, IHDR data, CRC
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
# What an upstream may have written about the image (text, EXIF, XMP, C2PA): dropped before ours goes in.
_PNG_DROPPED = frozenset({b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"caBX"})
_JPEG_APP0, _JPEG_SOS = 0xE0, 0xDA
_JPEG_DROPPED = frozenset({0xE1, 0xEB, 0xED, 0xFE})  # APP1 (EXIF, XMP), APP11 (JUMBF/C2PA), APP13 (IPTC), COM
_JPEG_MAX_SEGMENT = 0xFFFF
_WEBP_DROPPED = frozenset({b"EXIF", b"XMP ", b"C2PA"})
_VP8X_ALPHA, _VP8X_EXIF, _VP8X_XMP = 0x10, 0x08, 0x04
# Far above any encoder's (a 32 MB PNG in libpng's 8 KB IDATs has 4,096), far below what 32 MB of empty chunks would
# cost to walk (2.8 million, seconds of CPU).
MAX_CHUNKS = 100_000
XMP_PNG_KEYWORD = b"XML:com.adobe.xmp"
XMP_JPEG_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\0"
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


def recompress(data: bytes, output_format: str, quality: int) -> bytes:
    """Decode a JPEG or WebP and encode it again at `quality` (0..100), keeping its XMP packet."""
    with Image.open(BytesIO(data)) as image:
        image.load()
        options = {**_ENCODE_OPTIONS[output_format], "quality": quality}
        if xmp := image.info.get("xmp"):
            options["xmp"] = xmp
        out = BytesIO()
        image.save(out, format=output_format.upper(), **options)
    return out.getvalue()


def replace_metadata(
    data: bytes, image_format: str, size: tuple[int, int], xmp: bytes, png_text: tuple[str, str] | None = None
) -> bytes:
    """
    Drop the metadata an upstream may have put in the image and insert ours, without touching the pixel data.

    Dropped: text, EXIF, XMP and C2PA data (PNG `tEXt`/`iTXt`/`zTXt`/`eXIf`/`caBX`; JPEG APP1, APP11 (JUMBF),
    APP13 and comments; WebP `EXIF`/`XMP `/`C2PA`). Inserted: `xmp` as the format's XMP packet, and for PNG the
    optional `(keyword, text)` chunk.

    :param data: A PNG, JPEG or WebP already checked by `sniff`.
    :param image_format: `png`, `jpeg` or `webp`.
    :param size: (width, height), for the canvas of a WebP that gains an extended header.
    :param xmp: The XMP packet (UTF-8).
    :param png_text: A `(keyword, text)` text chunk for PNG, or None.
    :raises InvalidImageError: The image's chunk or segment structure is broken.
    """
    if image_format == "png":
        return _png_replace(data, xmp, png_text)
    if image_format == "jpeg":
        return _jpeg_replace(data, xmp)
    return _webp_replace(data, size, xmp)


def _png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def _png_text_chunk(keyword: str, text: str) -> bytes:
    """A `tEXt` chunk when the text is Latin-1, else an uncompressed UTF-8 `iTXt`."""
    try:
        return _png_chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _png_replace(png: bytes, xmp: bytes, png_text: tuple[str, str] | None) -> bytes:
    ours = [_png_chunk(b"iTXt", XMP_PNG_KEYWORD + b"\0\0\0\0\0" + xmp)]
    if png_text is not None:
        ours.append(_png_text_chunk(*png_text))
    kept: list[bytes | memoryview] = [png[:_IHDR_END], *ours]
    view, position = memoryview(png), _IHDR_END
    for _ in _chunk_budget("PNG"):
        if position == len(png):
            break
        if position + 12 > len(png):
            raise InvalidImageError("the upstream PNG has a broken chunk")
        (length,) = struct.unpack_from(">I", png, position)
        end = position + 12 + length
        if end > len(png):
            raise InvalidImageError("the upstream PNG has a broken chunk")
        if png[position + 4 : position + 8] not in _PNG_DROPPED:
            kept.append(view[position:end])
        position = end
    return b"".join(kept)


def _jpeg_replace(jpeg: bytes, xmp: bytes) -> bytes:
    segment = XMP_JPEG_NAMESPACE + xmp
    if len(segment) + 2 > _JPEG_MAX_SEGMENT:
        raise ValueError("the XMP packet does not fit in one JPEG segment")
    ours = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    view, position = memoryview(jpeg), 2  # after SOI
    kept: list[bytes | memoryview] = [jpeg[:2]]
    placed = False
    for _ in _chunk_budget("JPEG"):
        while jpeg[position : position + 2] == b"\xff\xff":
            position += 1  # fill bytes before a marker
        if position + 4 > len(jpeg) or jpeg[position] != 0xFF:
            raise InvalidImageError("the upstream JPEG has a broken segment")
        marker = jpeg[position + 1]
        if not placed and marker != _JPEG_APP0:  # after JFIF/JFXX, which must come first
            kept.append(ours)
            placed = True
        if marker == _JPEG_SOS:
            break
        (length,) = struct.unpack_from(">H", jpeg, position + 2)
        end = position + 2 + length
        if length < 2 or end > len(jpeg):
            raise InvalidImageError("the upstream JPEG has a broken segment")
        if marker not in _JPEG_DROPPED:
            kept.append(view[position:end])
        position = end
    kept.append(view[position:])  # the scans: entropy-coded data, kept byte for byte
    return b"".join(kept)


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def _webp_replace(webp: bytes, size: tuple[int, int], xmp: bytes) -> bytes:
    view, position = memoryview(webp), 12  # after "RIFF", size, "WEBP"
    chunks: list[bytes | memoryview] = []
    for _ in _chunk_budget("WebP"):
        if position == len(webp):
            break
        if position + 8 > len(webp):
            raise InvalidImageError("the upstream WebP has a broken chunk")
        (length,) = struct.unpack_from("<I", webp, position + 4)
        end = position + 8 + length + (length & 1)
        if end > len(webp):
            raise InvalidImageError("the upstream WebP has a broken chunk")
        if webp[position : position + 4] not in _WEBP_DROPPED:
            chunks.append(view[position:end])
        position = end
    if not chunks:
        raise InvalidImageError("the upstream WebP has no image data")
    first = bytes(chunks[0][:4])
    if first == b"VP8X":
        header = bytearray(chunks[0])
        header[8] = (header[8] | _VP8X_XMP) & ~_VP8X_EXIF
        chunks[0] = bytes(header)
    else:  # a simple VP8/VP8L file becomes extended, which is what allows metadata chunks
        flags = _VP8X_XMP
        if first == b"VP8L" and len(chunks[0]) >= 13 and chunks[0][12] & 0x10:  # VP8L header: alpha_is_used bit
            flags |= _VP8X_ALPHA
        width, height = size
        canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks.insert(0, _riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + canvas))
    chunks.append(_riff_chunk(b"XMP ", xmp))
    body = b"".join([b"WEBP", *chunks])
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _chunk_budget(image_format: str) -> Iterator[int]:
    """Up to MAX_CHUNKS loop turns; `InvalidImageError` if the loop has not stopped by then."""
    yield from range(MAX_CHUNKS)
    raise InvalidImageError(f"the upstream {image_format} has more than {MAX_CHUNKS} chunks")
