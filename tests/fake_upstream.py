"""A loopback HTTP server that speaks the Hugging Face text-to-image and image-to-image protocols, with faults.

POST any path with `{"inputs": prompt, "parameters": {...}}`; the answer is an image of the requested size in the
format the `Accept` header names (or a forced one), deterministic in prompt and seed. An image-to-image request
(`InferenceClient.image_to_image`'s: `{"inputs": base64 image, "parameters": {"prompt", "target_size", "strength",
...}}`) is answered with the input blended, by `strength`, with the image its prompt and seed draw. Tests queue
`Fault`s to make the next requests fail in a chosen way, and read `requests` to see exactly what reached the upstream.

A caller that hangs up while the upstream is still "generating" (latency or hang) is noticed at once and counted in
`abandoned`, as a real server notices a reset connection.

Run it alone for benchmarks: `python tests/fake_upstream.py --latency 0.3 --variants 8` prints its URL; `GET /stats`
then reports the calls in flight and their peak.
"""

import argparse
import base64
import binascii
import hashlib
import json
import select
import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

from PIL import Image

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class Fault:
    """One scripted misbehaviour for the next request.

    status/headers/body: answer with these instead of an image. hang: sleep this long before answering.
    trickle: send the image in small pieces, this many seconds apart. size: answer an image of this size instead.
    chunked: send the body with chunked transfer encoding, so no size is declared. close: drop the connection.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    hang: float = 0.0
    trickle: float = 0.0
    size: tuple[int, int] | None = None
    chunked: bool = False
    close: bool = False


@dataclass
class SeenRequest:
    """What reached the upstream."""

    path: str
    headers: dict[str, str]
    payload: dict


def render(prompt: str, seed: int, width: int, height: int, fmt: str) -> bytes:
    """A photo-like test image: colour gradients plus noise, fixed by prompt and seed."""
    digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 24 + digest[3] % 16)
    channels = [
        Image.eval(gradient.rotate(digest[i] * 360 / 256, expand=False), lambda v, k=digest[i + 4]: (v + k) % 256)
        for i in range(3)
    ]
    image = Image.merge("RGB", [Image.blend(c, noise, 0.25) for c in channels])
    out = BytesIO()
    image.save(out, format=_PIL_FORMATS[fmt])
    return out.getvalue()


class FakeUpstream:
    """The server, started on a free loopback port in a background thread (use as a context manager)."""

    def __init__(
        self,
        latency: float = 0.0,
        image_format: str | None = None,
        variants: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.image_format = image_format
        self.variants = variants
        self.faults: deque[Fault] = deque()
        self.requests: list[SeenRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.abandoned = 0
        self._lock = threading.Lock()
        self._images: OrderedDict[tuple, bytes] = OrderedDict()
        self._server = ThreadingHTTPServer((host, port), self._handler(), bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.handle_error = lambda *_: None  # dropped connections are part of the script
        self._server.request_queue_size = 1024  # the listen backlog: it must be set before listen() to count
        self._server.server_bind()
        self._server.server_activate()
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeUpstream":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail_next(self, *faults: Fault) -> None:
        """Queue faults, one per coming request."""
        self.faults.extend(faults)

    def image(self, prompt: str, seed: int, width: int, height: int, fmt: str) -> bytes:
        """The bytes this upstream answers for these parameters (cached)."""
        if self.variants:
            seed = int(hashlib.sha256(f"{prompt}\0{seed}".encode()).hexdigest(), 16) % self.variants
        key = (prompt, seed, width, height, fmt)
        with self._lock:
            if key in self._images:
                return self._images[key]
        data = render(prompt, seed, width, height, fmt)
        with self._lock:
            self._images[key] = data
            while len(self._images) > 256:
                self._images.popitem(last=False)
        return data

    def edit(self, encoded: str, params: dict, size: tuple[int, int] | None, fmt: str) -> bytes | None:
        """The image-to-image answer: the input at the target size, blended by `strength` with what the prompt draws."""
        try:
            source = Image.open(BytesIO(base64.b64decode(encoded, validate=True))).convert("RGB")
        except (binascii.Error, ValueError, OSError):
            return None
        target = params.get("target_size") or {}
        width, height = size or (target.get("width") or source.width, target.get("height") or source.height)
        drawn = Image.open(BytesIO(self.image(params["prompt"], params.get("seed") or 0, width, height, "png")))
        strength = params.get("strength")
        weight = 0.8 if strength is None else strength
        edited = Image.blend(source.resize((width, height)), drawn.convert("RGB"), weight)
        out = BytesIO()
        edited.save(out, format=_PIL_FORMATS[fmt])
        return out.getvalue()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                """`GET /stats`: calls in flight, their peak, requests seen; `?reset=1` restarts the peak from now."""
                if self.path.split("?")[0] != "/stats":
                    self._send(404, b"{}", {})
                    return
                with upstream._lock:
                    stats = {"in_flight": upstream.in_flight, "max_in_flight": upstream.max_in_flight,
                             "requests": len(upstream.requests), "abandoned": upstream.abandoned}  # fmt: skip
                    if self.path.endswith("reset=1"):
                        upstream.max_in_flight = upstream.in_flight
                self._send(200, json.dumps(stats).encode(), {})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with upstream._lock:
                    upstream.in_flight += 1
                    upstream.max_in_flight = max(upstream.max_in_flight, upstream.in_flight)
                try:
                    self._answer(raw)
                finally:
                    with upstream._lock:
                        upstream.in_flight -= 1

            def _answer(self, raw: bytes) -> None:
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {}
                upstream.requests.append(SeenRequest(self.path, dict(self.headers.items()), payload))
                try:
                    fault = upstream.faults.popleft()
                except IndexError:
                    fault = Fault()
                if not self._wait(upstream.latency + fault.hang):
                    with upstream._lock:
                        upstream.abandoned += 1
                    self.close_connection = True
                    return
                if fault.close:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault.status != 200 or fault.body is not None:
                    self._send(
                        fault.status, fault.body or b"", fault.headers, trickle=fault.trickle, chunked=fault.chunked
                    )
                    return
                prompt = payload.get("inputs")
                params = payload.get("parameters") or {}
                if not isinstance(prompt, str) or not prompt:
                    self._send(400, json.dumps({"error": "inputs must be a non-empty string"}).encode(), {})
                    return
                fmt = upstream.image_format or self.headers.get("Accept", "image/png").removeprefix("image/")
                fmt = fmt if fmt in _PIL_FORMATS else "png"
                if "prompt" in params:  # image-to-image: the input is the image, base64
                    body = upstream.edit(prompt, params, fault.size, fmt)
                    if body is None:
                        self._send(400, json.dumps({"error": "inputs must be a base64 image"}).encode(), {})
                        return
                else:
                    width, height = fault.size or (params.get("width") or 512, params.get("height") or 512)
                    body = upstream.image(prompt, params.get("seed") or 0, width, height, fmt)
                self._send(200, body, {"Content-Type": f"image/{fmt}", **fault.headers}, trickle=fault.trickle)

            def _wait(self, seconds: float) -> bool:
                """Sleep `seconds`; False as soon as the caller hangs up."""
                deadline = time.monotonic() + seconds
                readable, _, _ = select.select([self.connection], [], [], seconds)
                if not readable:
                    return True
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return False
                except OSError:
                    return False
                time.sleep(max(0.0, deadline - time.monotonic()))  # it sent more: still there
                return True

            def _send(
                self, status: int, body: bytes, headers: dict[str, str], trickle: float = 0.0, chunked: bool = False
            ) -> None:
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                if chunked:
                    headers["Transfer-Encoding"] = "chunked"
                elif "Content-Length" not in headers:
                    headers["Content-Length"] = str(len(body))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    if chunked:
                        for i in range(0, len(body), 16384):
                            piece = body[i : i + 16384]
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    elif not trickle:
                        self.wfile.write(body)
                        return
                    for i in range(0, len(body), 1024):
                        self.wfile.write(body[i : i + 1024])
                        self.wfile.flush()
                        time.sleep(trickle)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        return Handler


def main() -> None:
    """Serve until interrupted, printing the URL on the first line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--format", choices=sorted(_PIL_FORMATS), default=None)
    parser.add_argument("--variants", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on [a free one]")
    args = parser.parse_args()
    with FakeUpstream(args.latency, args.format, args.variants, args.host, args.port) as upstream:
        print(upstream.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
