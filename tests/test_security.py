"""
The server's surface, attacked through real servers: one regression test per refusal of the README's Security section.

Each test sends what an attacker (or a careless client) would, and checks both the answer and that nothing reached the
upstream. The CSRF case runs in headless Chromium: a page on another origin tries the POST.
"""

import http.client
import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, post_raw, running, server_env, start_server, stop_server
from fake_upstream import Fault

SMALL = {"prompt": "surface", "width": 64, "height": 64}


def raw(
    server, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict, bytes]:
    """One request with exactly these headers (http.client adds only Host, unless given, and Content-Length)."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


# --- Item 1: only the inventory's routes -------------------------------------------------------------------------


def test_deploy_files_cannot_load_code(server, fresh_upstream, tmp_path):
    """The remote-code-execution of the issue: Python in setup() posted to /deploy_files is never run."""
    marker = tmp_path / "pwned"
    wrapper = (
        "from hayhooks import BasePipelineWrapper\n"
        "class PipelineWrapper(BasePipelineWrapper):\n"
        f"    def setup(self):\n        open({str(marker)!r}, 'w').write('ran')\n"
        "    def run_api(self) -> str:\n        return 'x'\n"
    )
    body = json.dumps({"name": "evil", "files": {"pipeline_wrapper.py": wrapper}, "save_files": False}).encode()
    for path in ("/deploy_files", "/deploy-yaml", "/undeploy/image_generation"):
        status, _, _ = raw(server, "POST", path, {"Content-Type": "application/json"}, body)
        assert status in (404, 405)
    assert not marker.exists()
    assert raw(server, "GET", "/status")[0] == 200


# --- Item 3: safe defaults: CORS, Host, telemetry -------------------------------------------------------------------


def test_no_cross_origin_access_unless_listed(server, fresh_upstream):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}  # fmt: skip
    status, headers, _ = raw(server, "OPTIONS", "/image_generation/run", preflight)
    assert "access-control-allow-origin" not in headers
    assert status >= 400


def test_a_listed_origin_may_call(upstream, fresh_upstream, tmp_path):
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, HAYHOOKS_CORS_ALLOW_ORIGINS='["https://app.example"]')
    listed = start_server(tmp_path, env)
    try:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        _, headers, _ = raw(listed, "OPTIONS", "/image_generation/run", preflight)
        assert headers["access-control-allow-origin"] == "https://app.example"
        body = json.dumps(SMALL).encode()
        origin = {"Origin": "https://app.example", "Content-Type": "application/json"}
        assert raw(listed, "POST", "/image_generation/run", origin, body)[0] == 200
    finally:
        stop_server(listed)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:1416", "127.0.0.1.nip.example", "[::2]:80", ""])
def test_a_host_not_on_the_allow_list_is_refused(server, fresh_upstream, host):
    """DNS rebinding: a name that resolves to 127.0.0.1 still carries its own name in Host."""
    status, _, answer = raw(server, "POST", "/image_generation/run", {"Host": host, "Content-Type": "application/json"},
                            json.dumps(SMALL).encode())  # fmt: skip
    assert status == 400, answer
    assert fresh_upstream.requests == []


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "LOCALHOST:1416", "[::1]:8080"])
def test_loopback_names_are_answered(server, host):
    assert raw(server, "GET", "/status", {"Host": host})[0] == 200


def test_configured_hosts(upstream, tmp_path):
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_ALLOWED_HOSTS="images.example,*.corp,127.0.0.1"
    )
    configured = start_server(tmp_path, env, deployed=False)
    try:
        assert raw(configured, "GET", "/status", {"Host": "images.example:443"})[0] == 200
        assert raw(configured, "GET", "/status", {"Host": "api.corp"})[0] == 200
        assert raw(configured, "GET", "/status", {"Host": "corp.evil"})[0] == 400
        assert raw(configured, "GET", "/status", {"Host": "evilcorp"})[0] == 400  # `*.corp` is subdomains only
        assert raw(configured, "GET", "/status", {"Host": "evilcorp:443"})[0] == 400
        assert raw(configured, "GET", "/status", {"Host": "localhost"})[0] == 400  # the list replaces the default
    finally:
        stop_server(configured)


def test_haystack_telemetry_is_off_in_the_server():
    """The server package turns it off before Haystack is imported, whatever starts it (serve.sh, uvicorn)."""
    env = {k: v for k, v in server_env().items() if k != "HAYSTACK_TELEMETRY_ENABLED"}
    code = "import image_generation_server.app, haystack.telemetry._telemetry as t; print(t.telemetry)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "None"


# --- Item 4: never a 500 for what a client sends ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "width": Infinity}',
        b'{"prompt": "x", "width": 1e309}',
        b'{"prompt": "x", "seed": NaN}',
        b'{"prompt": "x", "num_inference_steps": -Infinity}',
        b'{"prompt": "x", "guidance_scale": 1e309}',
        b'{"prompt": "x", "output_format": "\\ud800"}',
        b'{"prompt": "x", "guidance_scale": "7"}',
        b'{"prompt": "x", "guidance_scale": true}',
        b'{"prompt": "x", "\\ud800": 1}',
        b'{"prompt": "x", "model": "\\ud800/\\udfff"}',
    ],
)
def test_hostile_values_are_a_422_that_echoes_nothing(server, fresh_upstream, body):
    status, headers, answer = post_raw(server, body)
    assert status == 422, answer
    assert headers["content-type"] == "application/json"
    assert b'"input"' not in answer
    assert b"Infinity" not in answer
    assert b"NaN" not in answer
    assert fresh_upstream.requests == []


def test_the_json_variant_maps_failures_instead_of_a_500(server, fresh_upstream):
    """Hayhooks' YAML route answers any failure 500 with its text; found by schemathesis on this route."""
    body = json.dumps({"prompt": "", "width": 64, "height": 64}).encode()
    status, _, answer = raw(server, "POST", "/image_generation_json/run", {"Content-Type": "application/json"}, body)
    assert (status, json.loads(answer)) == (422, {"detail": "prompt must be a non-empty string"})
    fresh_upstream.fail_next(Fault(status=500, body=b"internal upstream detail"))
    status, _, answer = raw(server, "POST", "/image_generation_json/run", {"Content-Type": "application/json"},
                            json.dumps(SMALL).encode())  # fmt: skip
    assert (status, json.loads(answer)) == (502, {"detail": "the upstream failed"})


def test_a_text_body_is_not_echoed(server, fresh_upstream):
    text = ("never echo me " * 4300).encode()  # 60 KB
    status, _, answer = post_raw(server, text, {"Content-Type": "text/plain"})
    assert status == 422
    assert b"never echo me" not in answer
    assert len(answer) < 1000


def test_openai_door_errors_echo_nothing_either(server, fresh_upstream):
    body = b'{"prompt": "x", "guidance_scale": Infinity, "\\ud800": 1}'
    status, _, answer = raw(server, "POST", "/v1/images/generations", {"Content-Type": "application/json"}, body)
    assert status == 400
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    assert b"Infinity" not in answer


@pytest.mark.parametrize("padding", [17 * 1024, 1_048_576])
def test_a_huge_header_is_refused(server, padding):
    """The head cap (16 KB): uvicorn's own httptools protocol accepted a 64 MiB header (and held it)."""
    try:
        status = raw(server, "GET", "/status", {"X-Padding": "a" * padding})[0]
    except (ConnectionResetError, BrokenPipeError):  # answered 400 and closed while the client was still sending
        status = 400
    assert status == 400
    assert raw(server, "GET", "/status")[0] == 200


def test_a_head_just_under_the_cap_is_served(server):
    assert raw(server, "GET", "/status", {"X-Padding": "a" * (15 * 1024)})[0] == 200


def test_a_head_split_across_many_packets_is_capped(server):
    """The cap counts every read of an unfinished head, however the client slices it."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\n")
        try:
            for _ in range(40):  # 40 headers of 1 KB, one packet each: 40 KB of head
                client.sendall(b"X-Padding: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.005)
        except (ConnectionResetError, BrokenPipeError):
            pass
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer


@pytest.fixture(scope="module")
def impatient_server(upstream, tmp_path_factory):
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_BODY_TIMEOUT="1", IMAGE_GENERATION_HEAD_TIMEOUT="1"
    )
    with running(tmp_path_factory.mktemp("impatient"), env) as server:
        yield server


def test_a_slow_body_is_cut_off(impatient_server, fresh_upstream):
    host, port = impatient_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as client:
        client.sendall(b"POST /image_generation/run HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
        started = time.monotonic()
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 20
    assert fresh_upstream.requests == []


def test_a_slow_head_is_cut_off(impatient_server):
    """Uvicorn has no deadline for a head: a client sending a header line every half second held its connection."""
    host, port = impatient_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=0.5) as client:
        client.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\n")
        started, answer = time.monotonic(), b""
        while not answer and time.monotonic() - started < 20:
            try:
                client.sendall(b"X-Slow: a\r\n")
                answer = client.recv(4096)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 5


def test_a_connection_that_sends_nothing_is_closed(impatient_server):
    host, port = impatient_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as client:
        started = time.monotonic()
        assert client.recv(4096) == b""
    assert time.monotonic() - started < 5


def test_the_head_deadline_leaves_keep_alive_and_slow_work_alone(impatient_server, fresh_upstream):
    """The deadline runs from a head's first byte: not while a kept-alive connection idles, nor while work runs."""
    host, port = impatient_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    fresh_upstream.latency = 1.5  # the answer takes longer than the head deadline
    try:
        sockets = []
        for _ in range(2):
            connection.request("POST", "/image_generation/run", json.dumps(SMALL), {"Content-Type": "application/json"})
            answer = connection.getresponse()
            assert (answer.status, answer.read()[:4]) == (200, b"\x89PNG")
            sockets.append(connection.sock)
            time.sleep(1.5)  # idle past the head deadline, within the keep-alive timeout
        assert sockets[0] is sockets[1]
    finally:
        fresh_upstream.latency = 0.0
        connection.close()


# --- Item 5: 412, 304 only from the cache, cache and coalescing per API key --------------------------------------


def test_if_none_match_star_is_a_412_before_any_work(server, fresh_upstream):
    status, _, _ = post_raw(server, json.dumps({**SMALL, "seed": 5}).encode(), {"If-None-Match": "*"})
    assert status == 412
    assert fresh_upstream.requests == []


def test_a_304_only_comes_from_the_cache(upstream, fresh_upstream, tmp_path):
    """Without a cache the image is made again, so the client gets it whole: a 304 would throw paid work away."""
    uncached = start_server(
        tmp_path, server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_CACHE_BYTES="0")
    )
    try:
        body = json.dumps({**SMALL, "seed": 11}).encode()
        _, headers, image = post_raw(uncached, body)
        status, _, again = post_raw(uncached, body, {"If-None-Match": headers["etag"]})
        assert (status, again) == (200, image)
        assert len(fresh_upstream.requests) == 2
    finally:
        stop_server(uncached)


@pytest.fixture(scope="module")
def keyed_server(upstream, tmp_path_factory):
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_API_KEYS="key-a,key-b")
    with running(tmp_path_factory.mktemp("keyed"), env) as server:
        yield server


def test_the_cache_is_per_api_key(keyed_server, fresh_upstream):
    """Key B cannot tell from timing (a cache hit) that key A made this prompt and seed."""
    body = json.dumps({**SMALL, "prompt": "per-key cache", "seed": 3}).encode()
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    assert post_raw(keyed_server, body, a)[0] == 200
    assert post_raw(keyed_server, body, a)[0] == 200  # a hit for the same key
    assert len(fresh_upstream.requests) == 1
    assert post_raw(keyed_server, body, b)[0] == 200  # a miss for another
    assert len(fresh_upstream.requests) == 2
    assert "key-a" not in keyed_server.log()


def test_coalescing_is_per_api_key(keyed_server, fresh_upstream):
    fresh_upstream.latency = 1.0
    body = json.dumps({**SMALL, "prompt": "per-key coalescing", "seed": 4}).encode()
    answers = []
    threads = [
        threading.Thread(target=lambda h=h: answers.append(post_raw(keyed_server, body, h)[0]))
        for h in ({"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"})
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200, 200]
    assert len(fresh_upstream.requests) == 2


def test_the_json_variant_needs_a_key_too(keyed_server, fresh_upstream):
    status, _, _ = raw(keyed_server, "POST", "/image_generation_json/run", {"Content-Type": "application/json"},
                       json.dumps(SMALL).encode())  # fmt: skip
    assert status == 401
    assert fresh_upstream.requests == []


# --- Item 6: readiness ------------------------------------------------------------------------------------------------


def test_ready_when_the_upstream_is_reachable(server, fresh_upstream):
    status, headers, answer = raw(server, "GET", "/ready")
    assert (status, json.loads(answer)) == (200, {"ready": True, "checks": {"pipeline": "ok", "upstream": "ok"}})
    assert headers["cache-control"] == "no-store"
    assert fresh_upstream.requests == []  # a TCP connect, no request: no money spent


def test_not_ready_when_the_upstream_is_unreachable(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}/generate"
    unreachable = start_server(tmp_path, server_env(IMAGE_GENERATION_ENDPOINT=closed))
    try:
        assert raw(unreachable, "GET", "/status")[0] == 200  # liveness stays cheap and green
        status, headers, answer = raw(unreachable, "GET", "/ready")
        assert (status, json.loads(answer)["checks"]["upstream"]) == (503, "unreachable")
        assert headers["retry-after"] == "5"
    finally:
        stop_server(unreachable)


# --- Item 7: schemathesis over every route, and CSRF in a real browser -----------------------------------------------


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_on_any_route(server, fresh_upstream, tmp_path):
    """Fuzz every operation the published OpenAPI schema lists (the doors, MCP, status, readiness): never a 5xx."""
    fuzz = subprocess.run(
        [str(Path(sys.executable).with_name("st")), "run", f"{server.url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "2", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert fuzz.returncode == 0, fuzz.stdout[-3000:]


class _EvilSite(http.server.BaseHTTPRequestHandler):
    """Serves one page whose script tries the POSTs a cross-site attacker would."""

    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: object) -> None:
        pass


def evil_page(target: str) -> bytes:
    body = json.dumps({**SMALL, "prompt": "csrf"})
    return f"""<!doctype html><title>cat pictures</title><script>
const target = {json.dumps(target)}, body = {json.dumps(body)};
window.attempts = Promise.allSettled([
  fetch(target, {{method: "POST", headers: {{"Content-Type": "application/json"}}, body}}),
  fetch(target, {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}),
]).then(results => results.map(r => r.status));
</script>""".encode()


@pytest.fixture
def other_origin():
    """A site on another port of 127.0.0.1 (another origin); set its `handler.page`, then open its `url`."""
    handler = type("Page", (_EvilSite,), {"page": b""})
    site = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    site.url = f"http://127.0.0.1:{site.server_address[1]}/"
    yield site
    site.shutdown()
    site.server_close()


@pytest.fixture
def evil_site(server, other_origin):
    other_origin.RequestHandlerClass.page = evil_page(f"{server.url}/image_generation/run")
    return other_origin.url


def test_a_page_on_another_origin_cannot_post(page, browser_log, evil_site, fresh_upstream):
    """Another port on 127.0.0.1 is another origin: its JSON POST fails the preflight, its simple POST gets a 403."""
    browser_log.allowed += [re.compile(p) for p in ("CORS policy", "net::ERR_FAILED", "status of 403", "status of 400")]
    statuses = []
    page.on("response", lambda r: statuses.append((r.request.method, r.status)) if "/run" in r.url else None)
    page.goto(evil_site)
    outcomes = page.evaluate("window.attempts")
    assert outcomes == ["rejected", "fulfilled"]  # the no-cors one is sent; its answer is opaque to the page
    assert ("POST", 403) in statuses
    assert fresh_upstream.requests == []


def test_a_listed_origin_can_post_from_the_browser(page, browser_log, other_origin, upstream, fresh_upstream, tmp_path):
    """The positive control of the test above: the same page, its origin listed in CORS, gets its images."""
    browser_log.allow_failed_request(422)  # the text/plain POST: not JSON
    origin = other_origin.url.rstrip("/")
    env = server_env(IMAGE_GENERATION_ENDPOINT=upstream.url, HAYHOOKS_CORS_ALLOW_ORIGINS=json.dumps([origin]))
    listed = start_server(tmp_path, env)
    try:
        other_origin.RequestHandlerClass.page = evil_page(f"{listed.url}/image_generation/run")
        page.goto(other_origin.url)
        assert page.evaluate("window.attempts") == ["fulfilled", "fulfilled"]
        assert len(fresh_upstream.requests) == 1  # the JSON POST; the text/plain one is not JSON (422, nothing sent)
    finally:
        stop_server(listed)
