"""
A demonstration upstream: it speaks the Hugging Face text-to-image protocol and draws labelled test patterns.

`./scripts/serve.sh --demo` starts it on a free loopback port and points the server at it
(`IMAGE_GENERATION_ENDPOINT`), so the whole service can be seen working with no token, no GPU and no network. It
generates nothing: every answer is colour bars with "DEMO" across them, the prompt, the seed and the size, so that
no one mistakes it for a model's work.

    python -m image_generation_server.demo_upstream [--port N]   # prints its URL on the first line
"""

import argparse
import colorsys
import hashlib
import json
import textwrap
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

from PIL import Image, ImageDraw, ImageFont

LABEL = "DEMO"
SUBTITLE = "test pattern, not a generated image"
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_MAX_SIDE = 2048  # the server never asks for more
_MAX_BODY = 65536


def draw(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """Colour bars (their hues shifted by the seed) under a band that says what this is and what was asked."""
    image = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(image)
    shift = hashlib.sha256(str(seed).encode()).digest()[0] / 256
    bars = 7
    for i in range(bars):
        r, g, b = colorsys.hsv_to_rgb((i / bars + shift) % 1.0, 0.75, 0.95)
        pen.rectangle(
            (i * width // bars, 0, (i + 1) * width // bars, height), fill=(int(r * 255), int(g * 255), int(b * 255))
        )
    unit = min(width, height)  # text scales with the short side
    band_top = height // 3
    pen.rectangle((0, band_top, width, height - height // 6), fill=(20, 20, 20))
    big = ImageFont.load_default(size=max(10, unit // 8))
    small = ImageFont.load_default(size=max(6, unit // 28))
    pen.text((width // 2, band_top + unit // 40), LABEL, font=big, fill="white", anchor="mt")
    lines = [
        SUBTITLE,
        *textwrap.wrap(prompt, max(16, width * 2 // max(1, unit // 28)))[:3],
        f"seed {seed} · {width}x{height}",
    ]
    y = band_top + unit // 40 + unit // 8 + unit // 60
    for line in lines:
        pen.text((width // 2, y), line, font=small, fill="white", anchor="mt")
        y += max(7, unit // 24)
    return image


def render(prompt: str, seed: int, width: int, height: int, mime_type: str) -> bytes:
    """The pattern in the format `mime_type` names (PNG for anything else)."""
    out = BytesIO()
    draw(prompt, seed, width, height).save(out, format=_FORMATS.get(mime_type, "PNG"))
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(413, b'{"error": "body too large"}', "application/json")
            return
        try:
            payload = json.loads(self.rfile.read(length))
            prompt = payload["inputs"]
            params = payload.get("parameters") or {}
            width, height = int(params.get("width") or 512), int(params.get("height") or 512)
            seed = int(params.get("seed") or 0)
            if not isinstance(prompt, str) or not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._send(
                400, b'{"error": "expected {\\"inputs\\": prompt, \\"parameters\\": {...}}"}', "application/json"
            )
            return
        accept = self.headers.get("Accept", "image/png")
        mime_type = accept if accept in _FORMATS else "image/png"
        self._send(200, render(prompt, seed, width, height, mime_type), mime_type)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    """Serve on 127.0.0.1 until stopped, printing the URL on the first line."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port to listen on [a free one]")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    server.daemon_threads = True
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
