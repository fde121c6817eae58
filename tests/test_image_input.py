"""Hostile uploads: each is refused with a short message naming the upload, before any pixel is decoded."""

import io
import struct
import tracemalloc
import zipfile
import zlib

import pytest
from PIL import Image

from components.image_input import (
    MAX_INPUT_PIXELS,
    InvalidInputImageError,
    composite,
    image_format,
    read_image,
    read_mask,
)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height`, its one IDAT a few rows: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width * 3 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PICTURE = Image.linear_gradient("L").resize((64, 48)).convert("RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_webp_are_read_by_content(fmt):
    source = read_image(encoded(PICTURE, fmt))
    assert (source.size, source.pixels.mode) == ((64, 48), "RGB")
    assert image_format(encoded(PICTURE, fmt)) == fmt.lower()


def test_lossless_pixels_are_kept_exactly():
    assert read_image(encoded(PICTURE)).pixels.tobytes() == PICTURE.tobytes()


def test_exif_orientation_is_applied_first():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    source = read_image(encoded(PICTURE, "JPEG", exif=exif))
    assert source.size == (48, 64)
    # A mask of the displayed size fits; one of the stored size does not.
    read_mask(encoded(Image.new("RGBA", (48, 64))), source.size)
    with pytest.raises(InvalidInputImageError, match="must be the image's size, 48x64"):
        read_mask(encoded(Image.new("RGBA", (64, 48))), source.size)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a" + b"\0" * 100, "image must be a PNG, JPEG or WebP file"),
        (encoded(PICTURE, "BMP"), "image must be a PNG, JPEG or WebP file"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image must be a PNG, JPEG or WebP file"),
        (encoded(PICTURE)[:-40], "image is a truncated PNG"),
        (encoded(PICTURE, "JPEG")[:-300], "image is a truncated JPEG"),
        (encoded(PICTURE, "WEBP")[:-10], "image is a truncated WebP"),
        (encoded(PICTURE, "WEBP") + b"PK\x03\x04", "image is a truncated WebP, or has data after its end"),
        (png_header_only(5000, 4000), f"image declares more than {MAX_INPUT_PIXELS} pixels"),
        (png_header_only(50_000, 50_000), f"image declares more than {MAX_INPUT_PIXELS} pixels"),
    ],
)
def test_hostile_uploads_are_refused(data, message):
    with pytest.raises(InvalidInputImageError, match=message):
        read_image(data)


def test_a_png_that_is_also_a_zip_is_refused():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.txt", "not an image")
    polyglot = encoded(PICTURE) + archive.getvalue()
    assert zipfile.is_zipfile(io.BytesIO(polyglot))  # a real polyglot: both readers accept it
    with pytest.raises(InvalidInputImageError, match="has data after the end of its PNG image"):
        read_image(polyglot)


def test_a_damaged_png_is_refused_without_a_500():
    data = bytearray(encoded(PICTURE))
    data[60:80] = b"\xff" * 20  # inside the compressed pixel data
    with pytest.raises(InvalidInputImageError, match="damaged or truncated"):
        read_image(bytes(data))


def test_a_bomb_header_is_refused_before_any_decode():
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputImageError, match="declares more than"):
            read_image(png_header_only(50_000, 50_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # 50,000² RGB would be 7.5 GB


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (encoded(Image.new("RGB", (64, 48))), "mask has no alpha channel"),
        (encoded(Image.new("L", (64, 48)), "JPEG"), "mask has no alpha channel"),
        (encoded(Image.new("RGBA", (32, 32))), "mask is 32x32; it must be the image's size, 64x48"),
        (encoded(Image.new("RGBA", (64, 48), (0, 0, 0, 255))), "mask has no fully transparent pixel"),
    ],
)
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(InvalidInputImageError, match=message):
        read_mask(mask, (64, 48))


def test_mask_marks_its_fully_transparent_pixels():
    mask = Image.new("RGBA", (64, 48), (9, 9, 9, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))
    mask.putpixel((40, 40), (0, 0, 0, 1))  # almost transparent: kept
    edit = read_mask(encoded(mask), (64, 48)).pixels
    assert edit.getpixel((8, 8)) == 255 and edit.getpixel((23, 23)) == 255
    assert edit.getpixel((40, 40)) == 0 and edit.getpixel((0, 0)) == 0


def test_composite_keeps_every_pixel_outside_the_mask_and_feathers_inside():
    source = read_image(encoded(PICTURE))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 8, 48, 40))
    edit = read_mask(encoded(mask), source.size)
    result = composite(Image.new("RGB", (64, 48), (255, 0, 0)), source, edit)
    for x in range(64):
        for y in range(48):
            if edit.pixels.getpixel((x, y)) == 0:
                assert result.getpixel((x, y)) == source.pixels.getpixel((x, y))
    assert result.getpixel((32, 24)) == (255, 0, 0)  # the middle of the mask: all edit
    edge = result.getpixel((16, 24))  # the mask's edge: a blend
    assert edge != (255, 0, 0) and edge != source.pixels.getpixel((16, 24))
