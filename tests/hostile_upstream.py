"""A loopback HTTP server whose every answer is scripted, and the hostile replies tests script it with.

`ScriptedServer` answers GET and POST by path (query ignored) from `routes`, and records every request in `hits`.
It plays the Hugging Face Hub (`hub_model`), a provider's result-URL host, or a hostile upstream. The reply
builders make what a hostile or broken upstream can send: a gzip bomb, a redirect, a JSON reply naming a URL, a
PNG declaring 50000x50000 pixels, and a real PNG padded with a large private chunk; odd `Retry-After` values are
plain headers, and images with spoofed metadata are built in `test_provenance.py`.
"""

import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fake_upstream import render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Reply:
    """One scripted answer; `hang` seconds pass before it is sent."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0


@dataclass
class Hit:
    """A request the server received."""

    method: str
    path: str
    headers: dict[str, str]


NOT_FOUND = Reply(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})


class ScriptedServer:
    """The server, on a free port of `host` (any 127.x address is loopback), in a background thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Reply] = {}
        self.hits: list[Hit] = []
        self._server = ThreadingHTTPServer((host, 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda *_: None  # clients that give up are part of the script
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def __enter__(self) -> "ScriptedServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def paths(self) -> list[str]:
        """The paths requested so far, queries dropped."""
        return [hit.path.split("?")[0] for hit in self.hits]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer()

            def _answer(self) -> None:
                scripted.hits.append(Hit(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                reply = scripted.routes.get(self.path.split("?")[0], NOT_FOUND)
                time.sleep(reply.hang)
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", "Content-Length": str(len(reply.body)), **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler


def hub_model(model: str, providers: dict[str, str], task: str = "text-to-image") -> Reply:
    """The Hub's answer to `GET /api/models/{model}?expand=inferenceProviderMapping` (provider -> provider's id)."""
    mapping = {name: {"providerId": pid, "status": "live", "task": task} for name, pid in providers.items()}
    return Reply(body=json.dumps({"_id": "0" * 24, "id": model, "inferenceProviderMapping": mapping}).encode())


def png(width: int, height: int, prompt: str = "hostile") -> bytes:
    """A real PNG of that size."""
    return render(prompt, 0, width, height, "png")


def json_with_url(url: str) -> bytes:
    """A fal-ai style reply: the image is at `url`."""
    return json.dumps({"images": [{"url": url, "content_type": "image/png"}]}).encode()


@cache
def gzip_bomb(expanded: int = 256 * 1024 * 1024) -> bytes:
    """Gzip data that inflates to `expanded` zero bytes (about 1000x its own size)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(expanded // len(block))]
    return b"".join(parts) + compressor.flush()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def padded_png(width: int, height: int, padding: int) -> bytes:
    """A real PNG of that size carrying `padding` bytes in a private ancillary chunk (decoders skip it)."""
    data = png(width, height, "padded")
    ihdr_end = len(PNG_SIGNATURE) + 8 + 13 + 4
    return data[:ihdr_end] + _chunk(b"prVt", bytes(padding)) + data[ihdr_end:]


def pixel_bomb_png(width: int = 50000, height: int = 50000) -> bytes:
    """A well-formed PNG header declaring `width` x `height` RGB pixels, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
