"""
Memory bounded by design (issue 22): what a door builds for its answer counts in `IMAGE_GENERATION_MAX_ANSWER_BYTES`
until it is sent, `n x width x height` has a cap, and a client that stops reading is cut off.

Real servers against a fake upstream; the load test measures the server process's resident memory while 24 clients
of `n: 10` at 2048² call `/v1`, 24 call `/mcp`, and 16 more send requests and never read their answers.
"""

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import running, server_env, wait_for
from fake_upstream import FakeUpstream, render
from jobs_client import JOBS, call, durable_env

MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
COMPOSE_LIMIT = 2 * 1024**3  # docker-compose.yml: the API service's memory limit
MARGIN = 512 * 1024**2  # what the peak must stay below the limit by
SEND_TIMEOUT = 2
RETRY_FOR = 30  # seconds a load client retries while the server is busy (all are served in about 100 s on 2 busy cores)
PROMPT = "load"  # every 2048² request asks for it: the upstream renders two images once (10 s each on a busy machine)


def mcp_call(tool: str = "generate_image", **arguments) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def mcp_result(answer: httpx.Response) -> dict:
    """The tool's result, from `/mcp`'s JSON reply (or its one-event stream, for a call that asks for progress)."""
    if answer.headers["content-type"].startswith("application/json"):
        return answer.json()["result"]
    [data] = [line for line in answer.text.splitlines() if line.startswith("data: {")]
    return json.loads(data.removeprefix("data: "))["result"]


def rss(pid: int) -> int:
    """The process's resident memory in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def request_bytes(server, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    host = server.url.removeprefix("http://")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    )
    return (head + "Accept: application/json, text/event-stream\r\n\r\n").encode() + payload


def never_reading(server, path: str, body: dict) -> socket.socket:
    """A client that sends its request and then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(request_bytes(server, path, body))
    return sock


@pytest.fixture(scope="module")
def big_upstream():
    """Photo-like 2048² PNGs (7 MB) of two variants per prompt, rendered once and then served from memory."""
    with FakeUpstream(variants=2) as upstream:
        for seed in range(8):  # both variants of the prompt the big requests use, rendered before any test times
            upstream.image(PROMPT, seed, 2048, 2048, "png")
        yield upstream


@pytest.fixture(scope="module")
def tight_server(big_upstream, tmp_path_factory):
    """Room for one 1024² answer at most, and a pixel cap of one 1024² image per request."""
    tmp = tmp_path_factory.mktemp("tight")
    env = server_env(
        **durable_env(),
        IMAGE_GENERATION_ENDPOINT=big_upstream.url,
        IMAGE_GENERATION_CACHE_BYTES="0",
        IMAGE_GENERATION_MAX_ANSWER_BYTES=str(12 * 1024**2),
        IMAGE_GENERATION_MAX_REQUEST_PIXELS=str(1024 * 1024),
        IMAGE_GENERATION_SEND_TIMEOUT=str(SEND_TIMEOUT),
        IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images"),
    )
    with running(tmp, env) as server:
        yield server


def test_pixels_per_request_are_capped_before_any_work(tight_server, big_upstream):
    big_upstream.requests.clear()
    answer = httpx.post(f"{tight_server.url}/v1/images/generations", json={"prompt": "x", "n": 5, "size": "512x512"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "n" and "IMAGE_GENERATION_MAX_REQUEST_PIXELS" in error["message"]
    result = mcp_result(httpx.post(f"{tight_server.url}/mcp", headers=MCP_HEADERS, json=mcp_call(prompt="x", n=5)))
    assert result["isError"] and "IMAGE_GENERATION_MAX_REQUEST_PIXELS" in result["content"][0]["text"]
    status, _, job = call(f"{tight_server.url}{JOBS}/run-durable", "POST", {"prompt": "x", "n": 5})
    assert status == 422 and b"IMAGE_GENERATION_MAX_REQUEST_PIXELS" in job
    assert big_upstream.requests == []


SOURCE_PNG = render("a source picture", 1, 64, 64, "png")
BIG_SOURCE_PNG = render("a source picture", 2, 1032, 1024, "png")  # over the tight server's cap at its own size


def edit_calls(server, source: bytes, **fields) -> dict[str, Callable[[], httpx.Response]]:
    """The same edit at each door that edits, and the JSON variant of generation of that size: each call, unsent."""
    b64 = base64.b64encode(source).decode()
    form = {"prompt": "x", **{name: str(value) for name, value in fields.items()}}
    size = {"size": f"{fields['width']}x{fields['height']}"} if "width" in fields else {}
    return {
        "/v1/images/edits": lambda: httpx.post(
            f"{server.url}/v1/images/edits", files={"image": ("a.png", source, "image/png")},
            data={"prompt": "x", **{k: v for k, v in form.items() if k not in ("width", "height")}, **size},
        ),
        "/image_editing/run": lambda: httpx.post(
            f"{server.url}/image_editing/run", files=[("files", ("a.png", source, "image/png"))], data=form
        ),
        "/image_editing_json/run": lambda: httpx.post(
            f"{server.url}/image_editing_json/run", json={"image": {"base64_image": b64}, "prompt": "x", **fields}
        ),
        "/image_generation_json/run": lambda: httpx.post(
            f"{server.url}/image_generation_json/run", json={"prompt": "x", **fields}
        ),
        "/mcp": lambda: httpx.post(
            f"{server.url}/mcp", headers=MCP_HEADERS, json=mcp_call("edit_image", image=b64, prompt="x", **fields)
        ),
    }  # fmt: skip


REFUSED = {"/v1/images/edits": 400, "/mcp": 200}  # a request refused: OpenAI's status; MCP's error result; else 422


def refused(door: str, answer: httpx.Response, reason: str) -> bool:
    """Whether `door` refused the request with its refusal status (an error result on MCP) saying `reason`."""
    return answer.status_code == REFUSED.get(door, 422) and reason in error_text(door, answer)


def error_text(door: str, answer: httpx.Response) -> str:
    """The answer's body; on MCP, the text of its error result (empty for a result that is not an error)."""
    if door != "/mcp":
        return answer.text
    result = mcp_result(answer)
    return result["content"][0]["text"] if result["isError"] else ""


def busy(door: str, answer: httpx.Response) -> bool:
    """Whether `door` answered that the server is busy: a 503 with `Retry-After`, an error result on MCP."""
    if door == "/mcp":
        return "busy" in error_text(door, answer)
    return (answer.status_code, answer.headers.get("retry-after")) == (503, "1")


def test_every_door_that_answers_images_caps_its_pixels_before_any_work(tight_server, big_upstream):
    """An edit's size is its width and height, else its image's own; the JSON variants and edit jobs take it too."""
    big_upstream.requests.clear()
    answers = {
        (door, size): send()
        for size, source, fields in (
            ("asked", SOURCE_PNG, {"width": 1024, "height": 1032}),
            ("own", BIG_SOURCE_PNG, {}),
        )
        for door, send in edit_calls(tight_server, source, **fields).items()
        if fields or door != "/image_generation_json/run"  # no image: the pipeline's default size, under the cap
    }
    reason = "IMAGE_GENERATION_MAX_REQUEST_PIXELS"
    assert [key for key, answer in answers.items() if not refused(key[0], answer, reason)] == []
    for source, fields in ((SOURCE_PNG, {"width": 1024, "height": 1032}), (BIG_SOURCE_PNG, {})):  # an edit job
        body = {"image": base64.b64encode(source).decode(), "prompt": "x", **fields}
        status, _, job = call(f"{tight_server.url}/image_editing/run-durable", "POST", body)
        assert status == 422 and reason.encode() in job, (fields, status, job)
    assert big_upstream.requests == []


@contextmanager
def an_answer_held(server, upstream: FakeUpstream) -> Iterator[None]:
    """A 1024² generation (two copies of 4 MB of base64 at their worst) holding its share while the upstream works."""
    body = {"prompt": "x", "size": "1024x1024"}
    gate = threading.Event()
    upstream.latency = 2.0
    try:
        first = ThreadPoolExecutor(1).submit(
            lambda: (gate.set(), httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=30))[1]
        )
        gate.wait()
        time.sleep(0.5)  # the first request holds its share while the upstream works
        calls = len(upstream.requests)
        yield
        assert len(upstream.requests) == calls  # nothing more reached the upstream
        assert first.result().status_code == 200
    finally:
        upstream.latency = 0.0
    assert httpx.post(f"{server.url}/v1/images/generations", json=body).status_code == 200  # room again


def test_an_answer_without_room_is_a_503_before_any_work(tight_server, big_upstream):
    """Three 1024² answers at their worst (4 MB of base64 each, two copies) do not fit 12 MB."""
    big_upstream.requests.clear()
    body = {"prompt": "x", "n": 3, "size": "512x512"}
    assert httpx.post(f"{tight_server.url}/v1/images/generations", json=body).status_code == 200
    with an_answer_held(tight_server, big_upstream):
        second = httpx.post(f"{tight_server.url}/v1/images/generations", json={"prompt": "x", "size": "1024x1024"})
        assert second.status_code == 503
        assert second.headers["retry-after"] == "1"
        assert second.json()["error"]["type"] == "server_error"
        call = mcp_call(prompt="x", width=1024, height=1024)
        assert busy("/mcp", httpx.post(f"{tight_server.url}/mcp", headers=MCP_HEADERS, json=call))


def test_edits_and_the_json_variants_without_room_are_503s_before_any_work(tight_server, big_upstream):
    big_upstream.requests.clear()
    with an_answer_held(tight_server, big_upstream):
        answers = {door: send() for door, send in edit_calls(tight_server, SOURCE_PNG, width=1024, height=1024).items()}
        answers["/v1/images/edits, streamed"] = httpx.post(
            f"{tight_server.url}/v1/images/edits", files={"image": ("a.png", SOURCE_PNG, "image/png")},
            data={"prompt": "x", "size": "1024x1024", "stream": "true"},
        )  # fmt: skip
        assert [door for door, answer in answers.items() if not busy(door, answer)] == []


# --- The worst case, measured --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(big_upstream, tmp_path_factory):
    """The default limits (the seeded cache off: every request does its work), a short send timeout."""
    tmp = tmp_path_factory.mktemp("default-limits")
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=big_upstream.url,
        IMAGE_GENERATION_CACHE_BYTES="0",
        IMAGE_GENERATION_SEND_TIMEOUT=str(SEND_TIMEOUT),
        IMAGE_GENERATION_IMAGE_DIR=str(tmp / "images"),
    )
    with running(tmp, env) as server:
        yield server


@pytest.mark.slow
def test_rss_stays_under_the_compose_limit_under_the_issues_load(default_server, big_upstream):
    pid = default_server.process.pid
    httpx.post(f"{default_server.url}/v1/images/generations", json={"prompt": PROMPT, "size": "2048x2048"}, timeout=60)
    start, peak, stop = rss(pid), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss(pid))
            time.sleep(0.02)

    def client(door: str, i: int) -> tuple[int, int, bool]:
        """One client: status, bytes of answer read, busy or not; it retries while the server is busy (`RETRY_FOR`)."""
        if door == "v1":
            url, body = "/v1/images/generations", {"prompt": PROMPT, "n": 10, "size": "2048x2048", "seed": i * 10}
        else:
            url, body = "/mcp", mcp_call(prompt=PROMPT, n=10, width=2048, height=2048, seed=i * 10)
        deadline = time.monotonic() + RETRY_FOR
        with httpx.Client(base_url=default_server.url, timeout=60, headers=MCP_HEADERS) as http:
            while True:
                with http.stream("POST", url, json=body) as answer:
                    size, head = 0, b""
                    for chunk in answer.iter_bytes():
                        size, head = size + len(chunk), head or chunk[:4096]
                busy = answer.status_code == 503 or (size < 4096 and b"busy" in head)  # MCP says so in its result
                if not busy or time.monotonic() > deadline:
                    return answer.status_code, size, busy
                time.sleep(float(answer.headers.get("retry-after", "1")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.monotonic()
    try:
        silent = [never_reading(default_server, "/v1/images/generations", {"prompt": PROMPT, "n": 10,
                  "size": "2048x2048", "seed": 1000 + i}) for i in range(16)]  # fmt: skip
        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(client, ["v1"] * 24 + ["mcp"] * 24, [*range(24), *range(24)]))
        for sock in silent:
            sock.close()
    finally:
        stop.set()
        watcher.join()
    took = time.monotonic() - began
    time.sleep(SEND_TIMEOUT + 1)
    after = rss(pid)
    report = {
        "start_mb": start >> 20,
        "peak_mb": peak[0] >> 20,
        "after_mb": after >> 20,
        "seconds": round(took),
        "served": [sum(not busy for _, _, busy in part) for part in (results[:24], results[24:])],
    }
    print("RSS", report)
    # each client got its ten 2048² images (94 MB of base64), or was told the server is busy (503, or MCP's error)
    assert all(
        (status == 200 and size > 90_000_000) if not busy else status in (200, 503) for status, size, busy in results
    )
    assert report["served"][0] >= 1 and report["served"][1] >= 1, report
    assert peak[0] < COMPOSE_LIMIT - MARGIN, report
    assert after < start + 256 * 1024**2, report


def test_a_client_that_stops_reading_is_cut_off(default_server):
    """Four 2048² images (37 MB of JSON) to a client that reads nothing: more than the kernel's socket buffers hold."""
    body = {"prompt": PROMPT, "size": "2048x2048", "n": 4}
    cut = "Client read nothing for 2.0 s: connection closed"
    earlier = default_server.log().count(cut)  # the module's server may have cut off clients of earlier tests
    sock = never_reading(default_server, "/v1/images/generations", body)
    try:
        assert wait_for(lambda: default_server.log().count(cut) > earlier, 30)
        received = 0
        sock.settimeout(5)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 30_000_000  # cut off mid-answer
    finally:
        sock.close()
