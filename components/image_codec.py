"""
Image bytes: recognise them, convert them only when asked for another format, and replace their metadata.

Pixels are decoded at most once per image, and not at all when the upstream already sent the requested format:
metadata (XMP, the PNG parameters text) is spliced in at chunk or segment level, the pixel data kept byte for byte.
"""

import struct
import zlib
from collections.abc import Iterator
from io import BytesIO

import pybase64
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
    APP13 and comments; WebP `EXIF`/`XMP `/`C2PA`). Inserted: `xmp` as the format's XMP packet (padded with up to
    two spaces, see `replace_metadata_base64`), and for PNG the optional `(keyword, text)` chunk.

    :param data: A PNG, JPEG or WebP already checked by `sniff`.
    :param image_format: `png`, `jpeg` or `webp`.
    :param size: (width, height), for the canvas of a WebP that gains an extended header.
    :param xmp: The XMP packet (UTF-8), ending with its `<?xpacket end=...?>` trailer.
    :param png_text: A `(keyword, text)` text chunk for PNG, or None.
    :raises InvalidImageError: The image's chunk or segment structure is broken.
    """
    view = memoryview(data)
    pieces = _splice(data, image_format, size, xmp, png_text)
    return b"".join(piece if isinstance(piece, bytes) else view[piece[0] : piece[1]] for piece in pieces)


def replace_metadata_base64(
    text: str, image_format: str, size: tuple[int, int], xmp: bytes, png_text: tuple[str, str] | None = None
) -> str:
    """
    `replace_metadata` on an image's base64 text, giving the base64 text of the same bytes.

    Only the headers are decoded. Base64 encodes 3 bytes as 4 characters, so the text of a kept range is copied as
    is wherever the range's bytes sit at the same offset modulo 3 in the old image and the new: the XMP is padded
    so that they do behind the inserted metadata. For a 1024² PNG this is a copy instead of a decode and an encode.
    The copied text is not checked: it is the base64 of whoever made the image.

    :raises InvalidImageError: The text is not base64, or the image's structure is broken.
    """
    source = _Base64Bytes(text)
    pieces = _splice(source, image_format, size, xmp, png_text)
    out: list[str] = []
    pending = bytearray()  # the next output bytes to encode; what `out` holds is a multiple of 3 bytes
    for piece in pieces:
        if isinstance(piece, bytes):
            pending += piece
            continue
        start, end = piece
        final = piece is pieces[-1] and end == len(source)  # then the text's last group, padding and all, is kept
        first, last = start + -start % 3, end if final else end - end % 3  # the range's whole 3-byte groups
        if first >= last or (len(pending) + first - start) % 3:  # none, or not at a group boundary in the output
            pending += source[start:end]
            continue
        pending += source[start:first]
        out.append(pybase64.b64encode_as_string(pending))
        if final:  # one copy of the rest of the text: a slice then a join would make two
            return text.replace(text[: first // 3 * 4], "".join(out), 1)
        out.append(text[first // 3 * 4 : last // 3 * 4])
        pending = bytearray(source[last:end])
    out.append(pybase64.b64encode_as_string(pending))
    return "".join(out)


class _Base64Bytes:
    """The bytes that base64 text stands for, decoded a window at a time where a parser reads them: the headers."""

    WINDOW = 3 * 1024  # bytes decoded at once: a JPEG's header segments, a PNG chunk's header

    def __init__(self, text: str) -> None:
        if len(text) % 4 or not text.isascii():
            raise InvalidImageError("the image is not base64")
        self.text = text
        self.length = len(text) // 4 * 3 - text[-2:].count("=")
        self._at, self._window = 0, b""

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> bytes:
        """The bytes of `[start:stop]` (the parsers' only kind of read), fewer past the end."""
        start, stop = key.start, min(key.stop, self.length)
        if start < self._at or stop > self._at + len(self._window):
            self._at = start - start % 3
            end = min(self.length, max(stop, self._at + self.WINDOW))
            try:
                self._window = pybase64.b64decode(self.text[self._at // 3 * 4 : -(-end // 3) * 4], validate=True)
            except ValueError as e:
                raise InvalidImageError("the image is not base64") from e
        return self._window[start - self._at : stop - self._at]


# What `_splice` returns: new bytes, or a (start, end) range of the image kept as it is.
Piece = bytes | tuple[int, int]
ImageBytes = bytes | _Base64Bytes


def _splice(
    data: ImageBytes, image_format: str, size: tuple[int, int], xmp: bytes, png_text: tuple[str, str] | None
) -> list[Piece]:
    """The pieces of the image with our metadata, the XMP padded to keep the largest kept range's offset modulo 3."""
    build = {"png": _png_pieces, "jpeg": _jpeg_pieces, "webp": _webp_pieces}[image_format]
    ours = _metadata_block(image_format, xmp, png_text)
    pieces = _joined(build(data, size, ours))
    offset, shift, largest = 0, 0, 0
    for piece in pieces:
        length = len(piece) if isinstance(piece, bytes) else piece[1] - piece[0]
        if not isinstance(piece, bytes) and length > largest:
            largest, shift = length, offset - piece[0]
        offset += length
    if shift % 3:
        padded = _metadata_block(image_format, _padded(xmp, -shift % 3), png_text)
        pieces = [padded if piece is ours else piece for piece in pieces]
    return pieces


def _metadata_block(image_format: str, xmp: bytes, png_text: tuple[str, str] | None) -> bytes:
    """What goes into the image: PNG chunks, a JPEG APP1 segment or a WebP chunk."""
    if image_format == "png":
        block = _png_chunk(b"iTXt", XMP_PNG_KEYWORD + b"\0\0\0\0\0" + xmp)
        return block + _png_text_chunk(*png_text) if png_text is not None else block
    if image_format == "jpeg":
        segment = XMP_JPEG_NAMESPACE + xmp
        if len(segment) + 2 > _JPEG_MAX_SEGMENT:
            raise ValueError("the XMP packet does not fit in one JPEG segment")
        return b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    return _riff_chunk(b"XMP ", xmp)


def _joined(pieces: list[Piece]) -> list[Piece]:
    """`pieces` with each run of adjacent kept ranges (a PNG's IDAT chunks) as one range."""
    joined: list[Piece] = []
    for piece in pieces:
        previous = joined[-1] if joined else None
        if isinstance(piece, tuple) and isinstance(previous, tuple) and previous[1] == piece[0]:
            joined[-1] = (previous[0], piece[1])
        else:
            joined.append(piece)
    return joined


def _padded(xmp: bytes, spaces: int) -> bytes:
    """`xmp` with `spaces` spaces of XMP padding before its trailer."""
    head, trailer, tail = xmp.rpartition(b"<?xpacket end=")
    return head + b" " * spaces + trailer + tail if trailer else xmp + b" " * spaces


def _png_chunk(chunk_type: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", zlib.crc32(chunk_type + body))


def _png_text_chunk(keyword: str, text: str) -> bytes:
    """A `tEXt` chunk when the text is Latin-1, else an uncompressed UTF-8 `iTXt`."""
    try:
        return _png_chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:
        return _png_chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _png_pieces(png: ImageBytes, _: tuple[int, int], ours: bytes) -> list[Piece]:
    pieces: list[Piece] = [(0, _IHDR_END), ours]
    position = _IHDR_END
    for _ in _chunk_budget("PNG"):
        if position == len(png):
            break
        header = png[position : position + 8]
        if len(header) < 8:
            raise InvalidImageError("the upstream PNG has a broken chunk")
        end = position + 12 + struct.unpack(">I", header[:4])[0]
        if end > len(png):
            raise InvalidImageError("the upstream PNG has a broken chunk")
        if header[4:] not in _PNG_DROPPED:
            pieces.append((position, end))
        position = end
    return pieces


def _jpeg_pieces(jpeg: ImageBytes, _: tuple[int, int], ours: bytes) -> list[Piece]:
    position = 2  # after SOI
    pieces: list[Piece] = [(0, 2)]
    placed = False
    for _ in _chunk_budget("JPEG"):
        while jpeg[position : position + 2] == b"\xff\xff":
            position += 1  # fill bytes before a marker
        header = jpeg[position : position + 4]
        if len(header) < 4 or header[0] != 0xFF:
            raise InvalidImageError("the upstream JPEG has a broken segment")
        marker = header[1]
        if not placed and marker != _JPEG_APP0:  # after JFIF/JFXX, which must come first
            pieces.append(ours)
            placed = True
        if marker == _JPEG_SOS:
            break
        (length,) = struct.unpack(">H", header[2:])
        end = position + 2 + length
        if length < 2 or end > len(jpeg):
            raise InvalidImageError("the upstream JPEG has a broken segment")
        if marker not in _JPEG_DROPPED:
            pieces.append((position, end))
        position = end
    pieces.append((position, len(jpeg)))  # the scans: entropy-coded data, kept byte for byte
    return pieces


def _riff_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def _webp_pieces(webp: ImageBytes, size: tuple[int, int], ours: bytes) -> list[Piece]:
    position = 12  # after "RIFF", size, "WEBP"
    chunks: list[Piece] = []
    for _ in _chunk_budget("WebP"):
        if position == len(webp):
            break
        header = webp[position : position + 8]
        if len(header) < 8:
            raise InvalidImageError("the upstream WebP has a broken chunk")
        (length,) = struct.unpack("<I", header[4:])
        end = position + 8 + length + (length & 1)
        if end > len(webp):
            raise InvalidImageError("the upstream WebP has a broken chunk")
        if header[:4] not in _WEBP_DROPPED:
            chunks.append((position, end))
        position = end
    if not chunks:
        raise InvalidImageError("the upstream WebP has no image data")
    start, end = chunks[0]
    first = webp[start : min(end, start + 13)]
    if first[:4] == b"VP8X":
        header = bytearray(webp[start:end])
        header[8] = (header[8] | _VP8X_XMP) & ~_VP8X_EXIF
        chunks[0] = bytes(header)
    else:  # a simple VP8/VP8L file becomes extended, which is what allows metadata chunks
        flags = _VP8X_XMP
        if first[:4] == b"VP8L" and len(first) >= 13 and first[12] & 0x10:  # VP8L header: alpha_is_used bit
            flags |= _VP8X_ALPHA
        width, height = size
        canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        chunks.insert(0, _riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + canvas))
    chunks.append(ours)
    body = 4 + sum(len(c) if isinstance(c, bytes) else c[1] - c[0] for c in chunks)  # "WEBP" and the chunks
    return [b"RIFF" + struct.pack("<I", body) + b"WEBP", *chunks]


def _chunk_budget(image_format: str) -> Iterator[int]:
    """Up to MAX_CHUNKS loop turns; `InvalidImageError` if the loop has not stopped by then."""
    yield from range(MAX_CHUNKS)
    raise InvalidImageError(f"the upstream {image_format} has more than {MAX_CHUNKS} chunks")
