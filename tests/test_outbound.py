"""
Every call that leaves the server, through real server processes: the `provider="auto"` path end to end against a
fake Hub and a fake router, result URLs from replies (fetched when allowed, refused when they point inside), and
credentials that come only from what we configure.

The fake Hub is a `ScriptedServer` named by `HF_ENDPOINT` (huggingface_hub reads it at import); the fake router is
the session's `FakeUpstream`, named by `IMAGE_GENERATION_ROUTER_URL`. The token is `hf_`-shaped, as huggingface_hub
routes only such tokens through the router, and is built at run time.
"""

import base64
import io
import ipaddress
import json
import secrets
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from conftest import Server, free_port, post, running, server_env, start_server, stop_server
from fake_upstream import Fault
from hostile_upstream import Reply, ScriptedServer, gzip_bomb, hub_model, json_with_url, png
from PIL import Image

from components.byte_budget import ByteBudget
from components.hf_providers import Call
from components.hf_transport import Bounds, fetch_async

SMALL = {"width": 64, "height": 64}
DEADLINE = 3


def hf_shaped_token() -> str:
    """A throwaway token shaped like a Hugging Face one (never a literal in the repository)."""
    return "hf_" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def hub() -> Iterator[ScriptedServer]:
    """The fake Hub on 127.0.0.1; its `/admin` path stands for something inside that must never be fetched."""
    with ScriptedServer("127.0.0.1") as server:
        server.routes["/admin"] = Reply(body=png(64, 64, "admin"), headers={"Content-Type": "image/png"})
        yield server


@pytest.fixture(scope="module")
def results_host() -> Iterator[ScriptedServer]:
    """Where providers leave result images: 127.0.0.2, the one loopback address the server is told to allow."""
    with ScriptedServer("127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> str:
    return hf_shaped_token()


@pytest.fixture(scope="module")
def auto_server(hub, upstream, token, tmp_path_factory) -> Iterator[Server]:
    """`provider="auto"`, no endpoint: the Hub and router are the fakes; the token comes from `HF_TOKEN_FILE`."""
    tmp = tmp_path_factory.mktemp("auto")
    (tmp / "secret").write_text(token + "\n")
    env = server_env(
        HF_ENDPOINT=hub.url,
        HF_TOKEN_FILE=str(tmp / "secret"),
        IMAGE_GENERATION_ROUTER_URL=upstream.url,
        IMAGE_GENERATION_RESULT_URL_ALLOW="127.0.0.2/32",
        IMAGE_GENERATION_TIMEOUT=str(DEADLINE),
    )
    del env["HF_TOKEN"]
    with running(tmp, env) as server:
        yield server


@pytest.fixture
def fresh(hub, results_host, fresh_upstream):
    hub.hits.clear()
    results_host.hits.clear()
    results_host.routes.clear()
    return fresh_upstream


def unique_model() -> str:
    """A model id the Hub lookup cache has never seen."""
    return f"acme/model-{secrets.token_hex(4)}"


def detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def test_known_model_goes_through_the_hub_and_the_router(auto_server, hub, fresh, token):
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = hub_model(model, {"hf-inference": model})

    code, headers, body = post(auto_server, {**SMALL, "prompt": "auto", "model": model})
    assert code == 200, body
    assert Image.open(io.BytesIO(body)).size == (64, 64)
    [lookup] = hub.hits
    assert lookup.path == f"/api/models/{model}?expand=inferenceProviderMapping"
    assert lookup.headers["authorization"] == f"Bearer {token}"
    [call] = fresh.requests
    assert call.path == f"/hf-inference/models/{model}"
    assert call.headers["authorization"] == f"Bearer {token}"
    assert call.headers["accept-encoding"] == "identity"
    assert call.payload["parameters"]["seed"] == int(headers["x-seed"])

    assert post(auto_server, {**SMALL, "prompt": "auto again", "model": model})[0] == 200
    assert len(hub.hits) == 1  # the lookup is cached per model
    assert len(fresh.requests) == 2


def test_unknown_model_is_422_and_asked_once(auto_server, hub, fresh):
    model = unique_model()  # no route: the Hub answers 404 RepoNotFound
    for _ in range(2):
        code, _, body = post(auto_server, {**SMALL, "prompt": "unknown", "model": model})
        assert code == 422
        assert "not available for text-to-image" in detail(body)
    assert len(hub.hits) == 1
    assert fresh.requests == []


@pytest.mark.parametrize(
    "providers",
    [{"hf-inference": "x"}, {"wavespeed": "x"}],
    ids=["another-task", "unsupported-provider"],
)
def test_model_without_a_usable_provider_is_422(auto_server, hub, fresh, providers):
    model = unique_model()
    task = "conversational" if "hf-inference" in providers else "text-to-image"
    hub.routes[f"/api/models/{model}"] = hub_model(model, providers, task=task)
    code, _, _ = post(auto_server, {**SMALL, "prompt": "no provider", "model": model})
    assert code == 422
    assert fresh.requests == []


@pytest.mark.parametrize(
    ("reply", "status", "retry_after"),
    [
        (Reply(503, b'{"error": "down"}', {"Retry-After": "30"}), 503, "30"),
        (Reply(500, b"<html>oops</html>"), 502, None),
        (Reply(200, b"not json"), 502, None),
        (Reply(302, b"", {"Location": "http://127.0.0.1:9/"}), 502, None),
    ],
    ids=["503", "500", "garbage", "redirect"],
)
def test_hub_failures_map_to_502_or_503(auto_server, hub, fresh, reply, status, retry_after):
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = reply
    code, headers, body = post(auto_server, {**SMALL, "prompt": "hub down", "model": model})
    assert code == status
    assert headers.get("retry-after") == retry_after
    assert hub.url not in body.decode()
    assert fresh.requests == []


def test_slow_hub_is_504_within_the_deadline(auto_server, hub, fresh):
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = Reply(hang=60, body=b"{}")
    started = time.monotonic()
    code, _, _ = post(auto_server, {**SMALL, "prompt": "slow hub", "model": model})
    assert code == 504
    assert time.monotonic() - started < 30  # the deadline is 3 s; unbounded, this would wait out the 60 s hang


def test_compressed_replies_are_never_asked_for_nor_inflated(auto_server, hub, fresh):
    """The upstream is asked for `identity`; one that gzips anyway is refused before a byte is inflated."""
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = hub_model(model, {"hf-inference": model})
    peak = peak_rss(auto_server)
    bomb = Fault(body=gzip_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})
    fresh.fail_next(*[bomb] * 8)
    with ThreadPoolExecutor(8) as pool:
        answers = pool.map(lambda i: post(auto_server, {**SMALL, "prompt": f"bomb {i}", "model": model})[0], range(8))
        assert list(answers) == [502] * 8
    assert {r.headers["accept-encoding"] for r in fresh.requests} == {"identity"}
    # Inflating up to the default 32 MiB cap, as a decoding client does, grows the peak by ~280 MB for 8 bombs.
    assert peak_rss(auto_server) - peak < 64 * 1024 * 1024


def peak_rss(server: Server) -> int:
    """The server process's peak resident memory so far, in bytes."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def fal_model(hub: ScriptedServer) -> str:
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = hub_model(model, {"fal-ai": "fal-ai/flux/schnell"})
    return model


def test_result_url_is_fetched_without_credentials(auto_server, hub, results_host, fresh, token):
    model = fal_model(hub)
    image = png(64, 64, "from the result host")
    results_host.routes["/files/out.png"] = Reply(body=image, headers={"Content-Type": "image/png"})
    fresh.fail_next(Fault(body=json_with_url(f"{results_host.url}/files/out.png")))

    code, _, body = post(auto_server, {**SMALL, "prompt": "fal", "model": model})
    assert code == 200, body
    assert Image.open(io.BytesIO(body)).tobytes() == Image.open(io.BytesIO(image)).tobytes()
    [call] = fresh.requests
    assert call.path == "/fal-ai/fal-ai/flux/schnell"
    assert call.headers["authorization"] == f"Bearer {token}"
    [download] = results_host.hits
    assert "authorization" not in download.headers
    assert download.headers["accept-encoding"] == "identity"
    assert download.headers["host"] == results_host.url.removeprefix("http://")


@pytest.mark.parametrize(
    "where",
    [
        "{inside}/admin",  # loopback, not on the allow-list
        "http://localhost:{port}/admin",
        "http://[::1]:{port}/admin",
        "http://169.254.169.254/latest/meta-data/",  # link-local (cloud metadata)
        "http://10.0.0.1/admin",  # private
        "http://2130706433:{port}/admin",  # 127.0.0.1 as one number
        "file:///etc/passwd",
        "http://[::1/admin",  # not a URL
        "http://" + "a" * 300 + ".example/admin",  # not a host name
    ],
)
def test_result_url_pointing_inside_is_refused(auto_server, hub, fresh, where):
    model = fal_model(hub)
    port = hub.url.rsplit(":", 1)[1]
    fresh.fail_next(Fault(body=json_with_url(where.replace("{inside}", hub.url).replace("{port}", port))))
    code, _, body = post(auto_server, {**SMALL, "prompt": "ssrf", "model": model})
    assert code == 502
    assert "/admin" not in hub.paths()
    assert "127.0.0.1" not in body.decode()


class Rebinding(aiohttp.abc.AbstractResolver):
    """A DNS answer that differs from the one checked: every name the session resolves points at `host:port`."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
        self.asked.append(host)
        return [{"hostname": host, "host": self.host, "port": self.port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_a_result_url_is_fetched_from_the_address_that_was_checked():
    """
    `localhost` is checked (127.0.0.1, allowed here); the session's own resolver would answer another address (a
    second DNS answer, as in DNS rebinding). The connection goes to the checked address, never to the other one.
    """
    image = png(64, 64, "checked")
    with ScriptedServer("127.0.0.1") as checked, ScriptedServer("127.0.0.3") as rebound:
        checked.routes["/out.png"] = Reply(body=image, headers={"Content-Type": "image/png"})
        rebound.routes["/out.png"] = Reply(body=png(64, 64, "inside"), headers={"Content-Type": "image/png"})
        port = int(checked.url.rsplit(":", 1)[1])
        call = Call("GET", f"http://localhost:{port}/out.png", "result", max_bytes=1 << 20)
        resolver = Rebinding("127.0.0.3", int(rebound.url.rsplit(":", 1)[1]))
        connector = aiohttp.TCPConnector(resolver=resolver)
        with ByteBudget(1 << 20).lease() as lease:
            allowed = (ipaddress.ip_network("127.0.0.1/32"),)
            bounds = Bounds(time.monotonic() + 5, lease, report=lambda _event: None, allowed_networks=allowed)
            async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
                assert await fetch_async(session, call, bounds) == image
        assert rebound.hits == [] and resolver.asked == []
        [hit] = checked.hits
        assert hit.headers["host"] == f"localhost:{port}"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Reply(302, b"", {"Location": "/files/elsewhere.png"}), 502),
        (Reply(body=gzip_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}), 502),
        (Reply(hang=60, body=b""), 504),
        (Reply(body=b"<html>not an image</html>", headers={"Content-Type": "text/html"}), 502),
    ],
    ids=["redirect", "gzip-bomb", "slow", "not-an-image"],
)
def test_result_url_replies_are_bounded(auto_server, hub, results_host, fresh, reply, status):
    model = fal_model(hub)
    results_host.routes["/files/out.png"] = reply
    results_host.routes["/files/elsewhere.png"] = Reply(body=png(64, 64), headers={"Content-Type": "image/png"})
    fresh.fail_next(Fault(body=json_with_url(f"{results_host.url}/files/out.png")))
    code, _, _ = post(auto_server, {**SMALL, "prompt": "bounded result", "model": model})
    assert code == status
    assert results_host.paths() == ["/files/out.png"]  # a redirect is never followed


def test_base64_and_created_replies(auto_server, hub, results_host, fresh):
    together, replicate = unique_model(), unique_model()
    hub.routes[f"/api/models/{together}"] = hub_model(together, {"together": "acme/t"})
    hub.routes[f"/api/models/{replicate}"] = hub_model(replicate, {"replicate": "acme/r"})
    image = png(64, 64, "inline")
    results_host.routes["/r.png"] = Reply(body=image, headers={"Content-Type": "image/png"})
    fresh.fail_next(
        Fault(body=json.dumps({"data": [{"b64_json": base64.b64encode(image).decode()}]}).encode()),
        Fault(status=201, body=json.dumps({"output": [f"{results_host.url}/r.png"]}).encode()),
    )
    assert post(auto_server, {**SMALL, "prompt": "together", "model": together})[0] == 200
    assert post(auto_server, {**SMALL, "prompt": "replicate", "model": replicate})[0] == 200
    assert [r.path for r in fresh.requests] == [
        "/together/v1/images/generations",
        "/replicate/v1/models/acme/r/predictions",
    ]
    assert results_host.paths() == ["/r.png"]


def test_stored_login_is_never_used(hub, upstream, tmp_path):
    """A token saved by `hf auth login` (in HF_HOME) is never sent: not to the Hub, not to the router."""
    stored = hf_shaped_token()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(stored)
    env = server_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), IMAGE_GENERATION_ROUTER_URL=upstream.url)
    del env["HF_TOKEN"], env["HF_HUB_OFFLINE"]
    model = unique_model()
    hub.routes[f"/api/models/{model}"] = hub_model(model, {"hf-inference": model})
    hub.hits.clear()
    upstream.requests.clear()
    server = start_server(tmp_path, env)
    try:
        code, _, _ = post(server, {**SMALL, "prompt": "no token", "model": model})
    finally:
        stop_server(server)
    assert code == 200
    assert len(hub.hits) == 1 and len(upstream.requests) == 1
    assert "authorization" not in hub.hits[0].headers
    assert "authorization" not in upstream.requests[0].headers
    assert stored not in server.log()
    assert (
        "No Hugging Face token (HF_API_TOKEN, HF_TOKEN or HF_TOKEN_FILE) and no IMAGE_GENERATION_ENDPOINT"
        in server.log()
    )


def test_unreachable_hub_is_502(upstream, tmp_path):
    env = server_env(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", IMAGE_GENERATION_ROUTER_URL=upstream.url)
    server = start_server(tmp_path, env)
    try:
        code, _, body = post(server, {**SMALL, "prompt": "no hub", "model": unique_model()})
    finally:
        stop_server(server)
    assert code == 502
    assert "upstream failed" in detail(body)
