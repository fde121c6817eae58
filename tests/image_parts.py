"""Test-side readers of image structure, independent of `components`: where each format keeps its coded pixels."""

import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def coded_pixels(data: bytes, image_format: str) -> bytes:
    """The compressed pixel data exactly as stored: PNG IDAT payloads, JPEG scans, WebP bitstream chunks."""
    if image_format == "png":
        assert data.startswith(PNG_SIGNATURE)
        parts, pos = [], len(PNG_SIGNATURE)
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] == b"IDAT":
                parts.append(data[pos + 8 : pos + 8 + length])
            pos += 12 + length
        return b"".join(parts)
    if image_format == "jpeg":
        assert data.startswith(b"\xff\xd8")
        pos = 2
        while data[pos + 1] != 0xDA:  # up to the first scan; everything after it is entropy-coded data
            (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
            pos += 2 + length
        return data[pos:]
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    parts, pos = [], 12
    while pos < len(data):
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        if data[pos : pos + 4] in (b"VP8 ", b"VP8L", b"ALPH", b"ANMF"):
            parts.append(data[pos + 8 : pos + 8 + length])
        pos += 8 + length + (length & 1)
    return b"".join(parts)
