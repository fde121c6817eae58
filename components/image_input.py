"""
Images a client uploads to be edited: checked from their header before anything is decoded, then decoded once.

An upload is refused with `InvalidInputImageError` (a 4xx, nothing sent upstream or computed) when it is not a PNG,
JPEG or WebP by its content (whatever it is labelled), when its header declares more than `MAX_INPUT_PIXELS`, when it
is truncated, or when bytes follow the image's end (a PNG that is also a ZIP, say). EXIF orientation is applied
before anything else looks at the pixels. A mask must be the image's size and have an alpha channel: its fully
transparent pixels mark what to change.

Only the decoded pixels go further, re-encoded as PNG when sent upstream: the client's bytes never leave the server.
"""

import struct
import warnings
from dataclasses import dataclass
from io import BytesIO

import xxhash
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from components.errors import InvalidRequestError

# 4096 x 4096: four times the largest output, about 50 MB of RGB once decoded.
MAX_INPUT_SIDE = 4096
MAX_INPUT_PIXELS = MAX_INPUT_SIDE * MAX_INPUT_SIDE
# The feather of a mask's edge, in pixels: 1 per 64 of the image's shorter side, at most 4 (a rank filter's cost grows
# with the square of its size).
FEATHER_MAX_RADIUS = 4
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class InvalidInputImageError(InvalidRequestError):
    """An uploaded image or mask is refused; the message names which and why, never its content."""


@dataclass(frozen=True, eq=False)
class SourceImage:
    """
    A checked, decoded upload: RGB pixels for an image, or for a mask an `L` image that is 255 where to edit.

    `digest` identifies the pixels (it goes into the cache key instead of the pixels).
    """

    pixels: Image.Image
    digest: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.pixels.size

    def resized(self, size: tuple[int, int]) -> "SourceImage":
        """The same picture at `size` (a mask stays a hard-edged mask)."""
        if size == self.size:
            return self
        resample = Image.Resampling.NEAREST if self.pixels.mode == "L" else Image.Resampling.LANCZOS
        return SourceImage(self.pixels.resize(size, resample), f"{self.digest}@{size[0]}x{size[1]}")

    def png(self) -> bytes:
        """The pixels as a PNG, as sent to an upstream."""
        out = BytesIO()
        self.pixels.save(out, format="PNG", compress_level=1)
        return out.getvalue()


def image_format(data: bytes) -> str | None:
    """`png`, `jpeg` or `webp` by the bytes themselves (never by a name or a MIME type); None for anything else."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_START):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_image(data: bytes, name: str = "image") -> SourceImage:
    """The checked upload as RGB pixels, EXIF orientation applied."""
    image = _decode(data, name)
    return SourceImage(image.convert("RGB"), _digest(image))


def read_mask(data: bytes, size: tuple[int, int], name: str = "mask") -> SourceImage:
    """
    The checked mask as an `L` image, 255 where its pixels are fully transparent (what to change), 0 elsewhere.

    :param size: The image's size, which the mask must have.
    """
    image = _decode(data, name)
    if image.size != size:
        raise InvalidInputImageError(
            f"{name} is {image.size[0]}x{image.size[1]}; it must be the image's size, {size[0]}x{size[1]}"
        )
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InvalidInputImageError(f"{name} has no alpha channel: its fully transparent pixels mark what to edit")
    alpha = image.convert("RGBA").getchannel("A")
    edit = alpha.point(lambda value: 255 if value == 0 else 0)
    if edit.getextrema() == (0, 0):
        raise InvalidInputImageError(f"{name} has no fully transparent pixel: nothing would be edited")
    return SourceImage(edit, _digest(edit))


def composite(edited: Image.Image, source: SourceImage, mask: SourceImage) -> Image.Image:
    """
    `edited` inside the mask, `source` outside it, exactly: the edge is feathered inside the mask only.

    The feather is the mask shrunk and blurred, then capped by the mask itself, so its weight is 0 wherever the mask
    is: those pixels are the source's, bit for bit.
    """
    radius = min(FEATHER_MAX_RADIUS, max(1, min(source.size) // 64))
    feather = mask.pixels.filter(ImageFilter.MinFilter(2 * radius + 1)).filter(ImageFilter.GaussianBlur(radius))
    weight = Image.composite(feather, mask.pixels, mask.pixels)  # min(feather, mask): 0 outside the mask
    return Image.composite(edited.convert("RGB").resize(source.size), source.pixels, weight)


def _decode(data: bytes, name: str) -> Image.Image:
    fmt = image_format(data)
    if fmt is None:
        raise InvalidInputImageError(f"{name} must be a PNG, JPEG or WebP file")
    _check_structure(data, fmt, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(BytesIO(data), formats=[_PIL_FORMATS[fmt]])  # reads the header only
            width, height = image.size
            if width * height > MAX_INPUT_PIXELS:
                raise InvalidInputImageError(_too_large(name))
            if getattr(image, "n_frames", 1) != 1:
                raise InvalidInputImageError(f"{name} is animated; send a single image")
            image.load()
            return ImageOps.exif_transpose(image)
    except InvalidInputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own limit, far above ours
        raise InvalidInputImageError(_too_large(name)) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
        raise InvalidInputImageError(f"{name} is damaged or truncated and cannot be decoded") from e


def _too_large(name: str) -> str:
    return f"{name} declares more than {MAX_INPUT_PIXELS} pixels ({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE})"


def _check_structure(data: bytes, fmt: str, name: str) -> None:
    """Refuse a file cut short or with bytes after its end (a polyglot): checked on the container, not the pixels."""
    if fmt == "png":
        if not data.endswith(_PNG_END):
            trailing = _PNG_END in data
            raise InvalidInputImageError(
                f"{name} has data after the end of its PNG image" if trailing else f"{name} is a truncated PNG"
            )
    elif fmt == "jpeg":
        if not data.rstrip(b"\x00").endswith(_JPEG_END):
            raise InvalidInputImageError(f"{name} is a truncated JPEG, or has data after its end")
    else:
        (declared,) = struct.unpack_from("<I", data, 4)
        if declared + 8 != len(data):  # RIFF pads every chunk to an even size: the file's size is exact
            raise InvalidInputImageError(f"{name} is a truncated WebP, or has data after its end")


def _digest(image: Image.Image) -> str:
    return xxhash.xxh3_128_hexdigest(image.tobytes() + repr((image.mode, image.size)).encode())
