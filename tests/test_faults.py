"""Upstream faults through the real server: every answer is an image or a correct, short, leak-free error."""

import email.utils
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    TEST_TOKEN,
    free_port,
    hang_up_during,
    post,
    running,
    server_env,
    start_server,
    stop_server,
    wait_for,
)
from fake_upstream import Fault
from hostile_upstream import gzip_bomb, padded_png, pixel_bomb_png, png

from components.errors import ImageGenerationError
from image_generation_server.responses import http_error

MAX_IMAGE_BYTES = 100_000  # a 64x64 test image is ~12 KB, a 512x512 one ~470 KB
MAX_INFLIGHT_BYTES = 150_000  # room for one 90 KB reply being read, not two


@pytest.fixture(scope="module")
def faulty_server(upstream, tmp_path_factory):
    """A server with a short deadline and a small image cap, so that timeouts and caps are quick to reach."""
    env = server_env(
        IMAGE_GENERATION_ENDPOINT=upstream.url,
        IMAGE_GENERATION_TIMEOUT="3",
        IMAGE_GENERATION_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
        IMAGE_GENERATION_MAX_INFLIGHT_BYTES=str(MAX_INFLIGHT_BYTES),
        HAYHOOKS_LOG_LEVEL="DEBUG",
    )
    with running(tmp_path_factory.mktemp("faulty"), env) as server:
        yield server


def assert_no_leak(body: bytes, upstream) -> None:
    text = body.decode(errors="replace")
    for secret in (TEST_TOKEN, "Bearer", upstream.url, "127.0.0.1", "Traceback", "object at 0x"):
        assert secret not in text
    assert len(text) < 300


SMALL = {"prompt": "fault", "width": 64, "height": 64}


@pytest.mark.parametrize(
    ("fault", "status", "message", "retry_after"),
    [
        (Fault(status=429, headers={"Retry-After": "7"}), 429, "rate limiting", "7"),
        (
            Fault(status=500, body=b"<html>Internal error at http://10.0.0.3/ token hf_x</html>"),
            502,
            "upstream failed",
            None,
        ),
        (Fault(status=502), 502, "upstream failed", None),
        (Fault(status=401, body=b'{"error": "Invalid credentials in Authorization header"}'), 502, "credentials", None),
        (Fault(status=403), 502, "upstream rejected the credentials", None),
        (Fault(status=400, body=b'{"error": "guidance_scale is too high"}'), 422, "guidance_scale is too high", None),
        (Fault(status=404, body=b"Not Found"), 502, "upstream failed", None),
        (
            Fault(body=b"<html><body>Welcome to nginx</body></html>", headers={"Content-Type": "text/html"}),
            502,
            "invalid image",
            None,
        ),
        (Fault(body=b"\x89PNG\r\n\x1a\n garbage", headers={"Content-Type": "image/png"}), 502, "invalid image", None),
        (Fault(size=(32, 32)), 502, "invalid image", None),
        (Fault(close=True), 502, "upstream failed", None),
        (Fault(status=302, headers={"Location": "/elsewhere"}), 502, "upstream failed", None),
        (Fault(status=302, body=png(64, 64), headers={"Content-Type": "image/png"}), 502, "upstream failed", None),
        (Fault(body=pixel_bomb_png(), headers={"Content-Type": "image/png"}), 502, "invalid image", None),
        (
            Fault(body=gzip_bomb(32 * 1024 * 1024), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"}),
            502,
            "invalid image",
            None,
        ),
        (Fault(status=429, headers={"Retry-After": "\u00b2"}), 429, "rate limiting", "5"),
        (Fault(status=429, headers={"Retry-After": "99999999999999"}), 429, "rate limiting", "3600"),
        (Fault(status=429, headers={"Retry-After": "86400"}), 429, "rate limiting", "3600"),
        (Fault(status=429, headers={"Retry-After": "-30"}), 429, "rate limiting", "5"),
        (Fault(status=429, headers={"Retry-After": "0"}), 429, "rate limiting", "1"),
        (Fault(status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), 429, "rate limiting", "1"),
        (Fault(status=503, body=b'{"error": "loading", "estimated_time": 1e300}'), 503, "unavailable", "3600"),
        (
            Fault(status=400, body=b'{"error": "bad <img src=x onerror=alert(1)>"}'),
            422,
            "the upstream rejected the parameters",
            None,
        ),
        (Fault(body=b'{"images": [{"url": 5}]}'), 502, "invalid image", None),
    ],
)
def test_upstream_failure_maps_to_status(faulty_server, fresh_upstream, fault, status, message, retry_after):
    fresh_upstream.fail_next(fault)
    code, headers, body = post(faulty_server, SMALL)
    assert code == status
    assert message in json.loads(body)["detail"]
    assert headers.get("retry-after") == retry_after
    assert "<" not in json.loads(body)["detail"]
    assert_no_leak(body, fresh_upstream)


def test_retry_after_as_an_http_date(faulty_server, fresh_upstream):
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    fresh_upstream.fail_next(Fault(status=429, headers={"Retry-After": later}))
    code, headers, _ = post(faulty_server, SMALL)
    assert code == 429
    assert 60 <= int(headers["retry-after"]) <= 121


def test_bytes_in_flight_are_capped_across_requests(faulty_server, fresh_upstream):
    """Two 90 KB replies read at once do not fit the 150 KB budget: one is a 503 to retry; each alone is served."""
    image = padded_png(64, 64, 90_000)
    slow = Fault(body=image, headers={"Content-Type": "image/png"}, trickle=0.02)  # ~2 s to read each
    fresh_upstream.fail_next(slow, slow)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda i: post(faulty_server, {**SMALL, "prompt": f"budget {i}"}), range(2)))
    assert sorted(code for code, _, _ in answers) == [200, 503]
    [(_, headers, body)] = [answer for answer in answers if answer[0] == 503]
    assert headers["retry-after"] == "1"
    assert "busy" in json.loads(body)["detail"]
    fresh_upstream.fail_next(Fault(body=image, headers={"Content-Type": "image/png"}))
    assert post(faulty_server, {**SMALL, "prompt": "budget alone"})[0] == 200  # and the lease was given back


def test_model_loading_503_is_retried_within_the_deadline(faulty_server, fresh_upstream):
    loading = Fault(status=503, body=b'{"error": "Model is currently loading", "estimated_time": 0.5}')
    fresh_upstream.fail_next(loading, loading)
    code, _, body = post(faulty_server, SMALL)
    assert code == 200
    assert body.startswith(b"\x89PNG")
    assert len(fresh_upstream.requests) == 3


def test_model_loading_past_the_deadline_is_503_with_retry_after(faulty_server, fresh_upstream):
    fresh_upstream.fail_next(Fault(status=503, body=b'{"error": "Model is currently loading", "estimated_time": 40}'))
    code, headers, body = post(faulty_server, SMALL)
    assert code == 503
    assert headers["retry-after"] == "40"
    assert len(fresh_upstream.requests) == 1
    assert_no_leak(body, fresh_upstream)


@pytest.mark.parametrize("fault", [Fault(hang=5), Fault(trickle=0.5)], ids=["hang", "trickle"])
def test_slow_upstream_is_cut_at_the_deadline(faulty_server, fresh_upstream, fault):
    fresh_upstream.fail_next(fault)
    code, _, body = post(faulty_server, SMALL)
    assert code == 504
    assert "did not answer in time" in json.loads(body)["detail"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "streamed"])
def test_oversized_image_is_refused(faulty_server, fresh_upstream, declared):
    big = fresh_upstream.image("big", 0, 512, 512, "png")
    assert len(big) > MAX_IMAGE_BYTES
    fresh_upstream.fail_next(Fault(body=big, headers={"Content-Type": "image/png"}, chunked=not declared))
    code, _, body = post(faulty_server, SMALL)
    assert code == 502
    assert "invalid image" in json.loads(body)["detail"]


def test_client_disconnect_cancels_the_upstream_call(faulty_server, fresh_upstream):
    fresh_upstream.latency = 2.5  # under the 3 s deadline: only the hang-up can end the call early
    body = json.dumps({**SMALL, "prompt": "left early"}).encode()
    hang_up_during(faulty_server, body, started=lambda: len(fresh_upstream.requests) == 1)
    assert wait_for(lambda: fresh_upstream.abandoned == 1, timeout=1.5), "the upstream call outlived its client"
    assert wait_for(lambda: "Client disconnected: cancelled POST /image_generation/run" in faulty_server.log())
    fresh_upstream.latency = 0
    assert post(faulty_server, SMALL)[0] == 200  # its admission slot is free again


def test_a_coalesced_caller_hanging_up_leaves_the_shared_call_to_the_others(faulty_server, fresh_upstream):
    fresh_upstream.latency = 2
    body = {**SMALL, "prompt": "shared call", "seed": 5}
    hang_ups = faulty_server.log().count("Client disconnected")
    with ThreadPoolExecutor(1) as pool:
        stayer = pool.submit(post, faulty_server, body)
        assert wait_for(lambda: len(fresh_upstream.requests) == 1)
        joined = lambda: faulty_server.log().count("'prompt': 'shared call'") == 2  # noqa: E731
        hang_up_during(faulty_server, json.dumps(body).encode(), started=joined, hold=0.3)
        assert stayer.result()[0] == 200
    assert (len(fresh_upstream.requests), fresh_upstream.abandoned) == (1, 0)
    assert faulty_server.log().count("Client disconnected") == hang_ups + 1


def test_refused_connection_is_502(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    server = start_server(tmp_path, server_env(IMAGE_GENERATION_ENDPOINT=dead))
    try:
        code, _, body = post(server, SMALL)
    finally:
        stop_server(server)
    assert code == 502
    assert "upstream failed" in json.loads(body)["detail"]
    assert dead not in body.decode()


def test_secrets_never_reach_the_log(faulty_server, fresh_upstream):
    prompt = "log control"
    assert post(faulty_server, {**SMALL, "prompt": prompt})[0] == 200
    assert fresh_upstream.requests[-1].headers["authorization"] == f"Bearer {TEST_TOKEN}"  # the token was in use
    assert wait_for(lambda: f"'prompt': '{prompt}'" in faulty_server.log())  # this very request was logged
    log = faulty_server.log()
    assert TEST_TOKEN not in log
    assert "Bearer" not in log


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ImageGenerationError("generation cancelled: nobody is waiting for it"), 503),  # the diffusers backend's
        (RuntimeError("wrapped"), 500),  # positive control: what is not ours stays a logged 500
    ],
)
def test_a_bare_generation_error_has_a_status(error, status):
    wrapped = RuntimeError("pipeline failed")
    wrapped.__cause__ = error
    assert http_error(wrapped).status_code == status
