"""Shared fixtures: a fake HF upstream on loopback and real `image-generation-server` processes pointed at it."""

import ast
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Haystack reads this when it is first imported: the tests' own pipelines must not try to send telemetry.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_upstream import FakeUpstream  # noqa: E402
from hayhooks.server.pipelines.registry import registry  # noqa: E402
from hayhooks.settings import settings  # noqa: E402
from haystack.dataclasses import ImageContent  # noqa: E402
from PIL import Image  # noqa: E402

pytest_plugins = ["browser"]  # the headless-browser fixtures (tests/browser.py)

HAYHOOKS = Path(sys.executable).with_name("hayhooks")
SERVER = Path(sys.executable).with_name("image-generation-server")  # what serve.sh and the container run
TEST_TOKEN = "test-token-that-must-never-leak-0123456789"
# The code that serves (the wrappers' folders included; `served/image_generation` and `served/image_editing` are links
# to pipelines/ and pipelines/image_editing/).
SERVED_CODE = (
    "components",
    "image_generation_server",
    "pipelines",
    "pipelines/image_editing",
    "served/image_generation_json",
    "served/image_editing_json",
)


@pytest.fixture(autouse=True)
def _no_real_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see a real token or a real endpoint from the developer's shell."""
    for name in ("HF_TOKEN", "HF_API_TOKEN", "HF_TOKEN_FILE", "IMAGE_GENERATION_ENDPOINT", "IMAGE_GENERATION_MODELS"):
        monkeypatch.delenv(name, raising=False)


def served_code() -> dict[str, ast.Module]:
    """Each module of the code that serves, parsed, by its path from the repository root."""
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text())
        for folder in SERVED_CODE
        for path in sorted((ROOT / folder).glob("*.py"))
    }


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server process."""

    url: str
    process: subprocess.Popen
    log_path: Path
    pipelines: list[str] = field(default_factory=list)  # as /status listed them at startup

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")


def server_env(**overrides: str) -> dict[str, str]:
    """The environment a test server runs with: the repo importable, no real credentials, no colour codes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "IMAGE_GENERATION_", "HAYHOOKS_"))}
    env.update(
        HF_TOKEN=TEST_TOKEN,
        HF_HUB_OFFLINE="1",
        HAYHOOKS_ADDITIONAL_PYTHON_PATH=str(ROOT),
        HAYSTACK_TELEMETRY_ENABLED="False",
        NO_COLOR="1",
    )
    env.update(overrides)
    return env


def start_server(
    tmp_dir: Path,
    env: dict[str, str],
    command: list[str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 60,
    deployed: bool = True,
) -> Server:
    """
    Start the server (or `command`) on a free port and wait until /status answers; with `deployed`, it must
    list `image_generation`.
    """
    port = free_port()
    env = {"HAYHOOKS_HOST": "127.0.0.1", "HAYHOOKS_PIPELINES_DIR": str(ROOT / "served"), **env}
    env["HAYHOOKS_PORT"] = str(port)
    server = launch(command or [str(SERVER)], cwd, env, tmp_dir / f"server-{port}.log", port, timeout)
    if deployed and "image_generation" not in server.pipelines:
        stop_server(server)
        raise RuntimeError(f"the server is up without image_generation:\n{server.log()}")
    return server


def launch(argv: list[str], cwd: Path, env: dict[str, str], log_path: Path, port: int | str, timeout: float) -> Server:
    """Run `argv` with its output in `log_path` and wait until /status on `port` answers (hayhooks deploys the
    startup pipelines before it serves, so the first answer lists them). Fails at once if the process exits."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/status", timeout=1) as r:
                server.pipelines = json.load(r).get("pipelines", [])
                return server
        except OSError:
            time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"the server did not answer /status in {timeout}s:\n{server.log()}")


@contextmanager
def running(tmp_dir: Path, env: dict[str, str], **options: Any) -> Iterator[Server]:
    """`start_server(tmp_dir, env, **options)`, stopped when the block ends."""
    server = start_server(tmp_dir, env, **options)
    try:
        yield server
    finally:
        stop_server(server)


def stop_server(server: Server) -> None:
    """Terminate the process and wait for it."""
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    """One fake upstream for the session; `fresh_upstream` resets it before each test that uses it."""
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fresh_upstream(upstream: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream with no queued faults, no recorded requests and no latency."""
    upstream.faults.clear()
    upstream.requests.clear()
    upstream.latency = 0.0
    upstream.image_format = None
    upstream.max_in_flight = 0
    upstream.abandoned = 0
    return upstream


@pytest.fixture(scope="session")
def server(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real hayhooks server whose upstream is the fake, shared by the session."""
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "tmp").mkdir()
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, TMPDIR=str(tmp / "tmp"), XDG_CACHE_HOME=str(tmp / "cache"))
    with running(tmp, env) as srv:
        yield srv


def decode(image: ImageContent) -> Image.Image:
    """The picture inside a component's `ImageContent` output."""
    return Image.open(io.BytesIO(base64.b64decode(image.base64_image)))


def post_raw(server: Server, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """POST bytes to the image route; returns status, headers (lower-case names) and body, errors included."""
    request = urllib.request.Request(
        f"{server.url}/image_generation/run", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def exchange(server: Server, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """One bodiless request (GET, HEAD, DELETE ...): status, lower-cased headers and body."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hang_up_during(server: Server, body: bytes, started: Callable[[], bool], hold: float = 0.0) -> None:
    """POST `body` to the image route over a raw socket and close it, unanswered, `hold` s after `started()` holds."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(
            b"POST /image_generation/run HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )
        assert wait_for(started, timeout=30), "the request never started"
        time.sleep(hold)


def post(server: Server, body: dict) -> tuple[int, dict[str, str], bytes]:
    """POST a JSON body to the image route."""
    return post_raw(server, json.dumps(body).encode())


@pytest.fixture
def hayhooks_settings(monkeypatch, upstream):
    """Hayhooks' settings for an in-process app serving our pipelines against the fake upstream."""
    monkeypatch.setenv("IMAGE_GENERATION_ENDPOINT", upstream.url)
    monkeypatch.setattr(settings, "pipelines_dir", str(ROOT / "served"))
    monkeypatch.setattr(settings, "durable_store", "memory")
    for name in ("cors_allow_origins", "cors_allow_methods", "cors_allow_headers", "cors_expose_headers"):
        monkeypatch.setattr(settings, name, getattr(settings, name))  # create_app sets our defaults; undo after
    for name in ("tracing_enabled", "tracing_include_haystack_spans", "tracing_buffer_capacity"):
        # create_app sets these process-wide, in any earlier test too: start from Hayhooks' defaults, restore after
        monkeypatch.setattr(settings, name, type(settings).model_fields[name].get_default())
    registry.clear()  # live mode deploys into Hayhooks' process-wide registry
    yield settings
    registry.clear()
